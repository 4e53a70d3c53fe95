# The recursive 360M of shared notes 002 (SmolLM-360M shape, "rec2, middle-cycle": the Mixture-of-Recursions
# paper's recursive baseline), in this architecture, with expert-choice routing on top:
#   torchrun --nproc_per_node=4 train.py config/mor_360m.py
#   python sizing.py config/mor_360m.py         # the counts (README, "Mixture-of-Recursions")
# Shape: 32 applied layers of width 960, 15 query and 5 kv heads of 64; the first and last layers are their own,
# the 30 between them are 15 shared blocks run twice (middle_cycle): 17 unique blocks.
# One expert, always chosen (n_expert = 1): a dense SwiGLU of 2,560 like SmolLM's, so the comparison with the
# notes' run (261.5M trainable parameters, final loss 2.88) is about recursion, not about experts; set n_expert
# and experts_per_token to make it an MoE. GPT-OSS parts stay: sinks, sliding window 128 on every other layer.
# Vocabulary: the notes' model used SmolLM's 49,152 tokens; here o200k_base's first 49,152 merges (ids are
# o200k's own, tiktoken-fast, and the same family as every other config), 49,216 padded to a multiple of 64.
# Untied, as the notes' model was: 261.8M parameters here against its 261.5M (the rest: gpt-oss's biases, sinks).
out_dir = "out/mor_360m"
data_dir = "data/fineweb_edu_o200k49k"
data_recipe = "--encoding=o200k_base:49152"
vocab_size = 49216
tie_embeddings = False
n_layer = 32
n_embd = 960
n_head = 15
n_kv_head = 5
head_dim = 64
n_expert = 1
experts_per_token = 1
intermediate_size = 2560
sliding_window = 128
n_recursion = 2
recursion_sharing = "middle_cycle"
mor_router = "expert"  # capacities 1, 1/2 of each sequence; "none" is the notes' recursive baseline
block_size = 1024
# the notes' 1,024 sequences of 1,024 tokens per step: 256 micro batches of 4 (64 on each of 4 GPUs)
batch_size = 4
grad_accum_steps = 256
sync_grads_every_micro_step = True  # FSDP keeps only its gradient shard between micro steps
lr = 3e-3
min_lr = 6e-5
warmup_iters = 200
max_iters = 9438
lr_decay_iters = 9438
eval_interval = 500
eval_iters = 20
save_every = 500
