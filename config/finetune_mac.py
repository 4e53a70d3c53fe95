# Fine-tune a pretrained mac_micro model with LoRA, on a 16 GB Mac or any CPU, with no download:
#   python train.py config/mac_micro.py                 # first, a base (or any nanoOSS / HF GptOss checkpoint)
#   python train.py config/finetune_mac.py              # then this: rank-8 adapters, the base frozen
#   python sample.py --out_dir=out/finetune_mac --chat=True --start="json.dumps(obj, *, indent=None)"
# The data (built on first use, one line says so): the standard library's public functions and methods, the
# prompt a signature (`module.name(args)`), the completion its docstring; only the docstring is trained. The
# validation split is the records of modules that the stdlib pretraining corpus leaves out (prepare_fineweb.py,
# API_HOLDOUT), so the base has never read those docstrings: a fair before/after (README, "Fine-tuning").
init_from = "out/mac_micro"
out_dir = "out/finetune_mac"
data_dir = "data/stdlib_api"
data_recipe = "--corpus=stdlib_api --encoding=o200k_base:32768"
lora_rank = 8  # adapters on q, k, v, o and every expert: 1.30M parameters, 2.3% of the base
lora_alpha = 16.0
lora_targets = "q,k,v,o,experts"
block_size = 512
batch_size = 8
grad_accum_steps = 1
lr = 1e-3
min_lr = 1e-4
warmup_iters = 20
max_iters = 150
lr_decay_iters = 150
eval_interval = 50
eval_iters = 4  # the held-out split is 18k tokens: 4 batches of 8 x 512
save_every = 100
sample_every = 0
log_interval = 10
