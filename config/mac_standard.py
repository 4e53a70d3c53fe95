# The top rung for a 16 GB Mac: a GPT-OSS-shaped MoE for 8-10 GB of training memory (MPS, bf16 autocast);
# close nothing else while it runs, and run it under safe_train.py.
#   python safe_train.py config/mac_standard.py
# 248.5M parameters, 86.1M active per token: 11 layers, width 640, 8 experts of 1280 with top-2, GQA 10:2.
# Sizing: AdamW's 16 bytes a parameter make 248M parameters 4.0 GB of weights, gradients and moments; the
# notes' projected "250M active" would be ~720M in total, 11.5 GB of state alone: no 16 GB Mac trains that.
# sizing.memory_estimate at micro batch 4 x 512, 8 accumulation steps: 8.99 GB on MPS (bf16), 9.67 GB on CPU (fp32)
# (measured on CPU: 9.05 GB, bench/memory.py).
out_dir = "out/mac_standard"
data_dir = "data/mac_micro"
# built by train.py on first use when missing (one line says so): the docstrings of Python's standard library,
# a 1.5 MB English corpus every Python install carries, in o200k_base's first 32,768 merges, 100k val tokens
data_recipe = "--corpus=stdlib --encoding=o200k_base:32768 --val_tokens=100000"
vocab_size = 32832  # 32768 merges + <|endoftext|>, padded to a multiple of 64
tie_embeddings = True
n_layer = 11
n_embd = 640
n_head = 10
n_kv_head = 2
head_dim = 64
n_expert = 8
experts_per_token = 2
intermediate_size = 1280
sliding_window = 128
block_size = 512
batch_size = 4
grad_accum_steps = 8  # 16k tokens per step
lr = 5e-4
min_lr = 5e-5
warmup_iters = 200
max_iters = 5000
lr_decay_iters = 5000
eval_interval = 250
eval_iters = 20
save_every = 250
sample_every = 250
log_interval = 10
