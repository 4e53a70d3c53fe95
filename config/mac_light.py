# The next rung after mac_micro: a GPT-OSS-shaped MoE for 6-8 GB of training memory (a 16 GB Mac with room for
# the system; MPS, bf16 autocast).
#   python train.py config/mac_light.py          (or python safe_train.py config/mac_light.py)
# 186.4M parameters, 68.3M active per token: 8 layers, width 640, 8 experts of 1280 with top-2, GQA 10:2.
# Sizing: AdamW keeps fp32 weights, gradients and two moments, 16 bytes a parameter whatever the autocast
# dtype: 186M parameters are 3.0 GB before any activation. The notes' "150M active" would be ~410M in total
# at this sparsity, 6.5 GB of optimizer state alone: past the band. So the band sets the total; active follows.
# sizing.memory_estimate at micro batch 4 x 512, 8 accumulation steps: 6.84 GB on MPS (bf16), 7.32 GB on CPU (fp32).
out_dir = "out/mac_light"
data_dir = "data/mac_micro"
# built by train.py on first use when missing (one line says so): the docstrings of Python's standard library,
# a 1.5 MB English corpus every Python install carries, in o200k_base's first 32,768 merges, 100k val tokens
data_recipe = "--corpus=stdlib --encoding=o200k_base:32768 --val_tokens=100000"
vocab_size = 32832  # 32768 merges + <|endoftext|>, padded to a multiple of 64
tie_embeddings = True
n_layer = 8
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
lr = 6e-4
min_lr = 6e-5
warmup_iters = 200
max_iters = 5000
lr_decay_iters = 5000
eval_interval = 250
eval_iters = 20
save_every = 250
sample_every = 250
log_interval = 10
