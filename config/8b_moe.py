# The production model of the GPT-OSS-6B guide: ~8B total, ~2.2B active parameters per token (not counting
# the embedding and output matrices), trained on 8 GPUs with FSDP2:
#   torchrun --nproc_per_node=8 train.py config/8b_moe.py
# Exact counts, from sizing.param_counts on the meta device (README, "Multi-GPU"):
#   7,873,597,696 total; 3,039,793,408 active per token, of which 823,656,448 are the embedding and
#   output matrices (o200k, untied), so 2,216,136,960 in the layers.
# 32 layers, width 2048, GQA with 64 query heads and 8 KV heads of 64, 8 experts of width 4096, top-2.
data_dir = "data/fineweb_edu"  # python prepare_fineweb.py (o200k_base), before the run: 10B tokens take hours
data_recipe = ""  # never built by train.py: 7 ranks would wait on rank 0 past NCCL's timeout
out_dir = "out/8b_moe"
vocab_size = 201088  # o200k_harmony's size, padded as in gpt-oss; o200k_base data fits under it
n_layer = 32
n_embd = 2048
n_head = 64
n_kv_head = 8
head_dim = 64
n_expert = 8
experts_per_token = 2
intermediate_size = 4096
sliding_window = 128
attn_pattern = "SF"
tie_embeddings = False
# 4096-token training context; YaRN (factor 32 over the 4096 original) stretches RoPE toward 131K, as gpt-oss
block_size = 4096
initial_context_length = 4096
rope_scaling_factor = 32.0
rope_theta = 150000.0
router_aux_loss_coef = 0.005
# per GPU: micro batch 4 x 4096 tokens, 32 accumulation steps; grad_accum_steps counts all ranks (as
# nanoGPT), so 256 = 32 on each of 8 GPUs, and the same 4.2M tokens per step on any number of GPUs
batch_size = 4
grad_accum_steps = 256
# reduce-scatter the gradients after every micro step: each GPU then keeps only its shard of them (30.4 GB per
# GPU by the estimate). Skipping the sync until the last micro step keeps whole fp32 gradients on every GPU
# (+33.4 GB: 63.8 GB, too close to 80 for an estimate not yet checked under FSDP) for 32x less reduce traffic; the
# per-micro-step reduce-scatter of ~28 GB per GPU overlaps the backward, about 0.1 s of a micro step of ~0.7 s.
sync_grads_every_micro_step = True
# without these a micro batch of 16k tokens needs over 200 GB of activations and 46 GB of logits per GPU;
# with them (and the per-micro-step sync below), ~30 GB per GPU in all on 8 GPUs (python sizing.py config/8b_moe.py)
activation_checkpointing = True
loss_chunk = 1024  # 1024 x 201k logits at a time, fused with their gradient: 3.0 GB with the head's fp32 gradient
dtype = "bfloat16"
compile = True
lr = 3e-4
min_lr = 3e-5
weight_decay = 0.1
grad_clip = 1.0
warmup_iters = 2000
lr_decay_iters = 50000
max_iters = 50000
eval_interval = 500
eval_iters = 16  # a multiple of the GPU count: evals are then the same on any number of GPUs
save_every = 500
keep_last_n = 3
sample_every = 1000
log_interval = 10
