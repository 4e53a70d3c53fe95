"""
sizing.memory_estimate against the real thing: each config trains for a few steps (an eval included) in a
fresh train.py process, and its peak resident memory (the kernel's high-water mark, from wait4) is set beside
the estimate. With --device=cuda the peak is the caching allocator's reservation, torch.cuda.max_memory_reserved
(train.py's heartbeat writes it as max_memory_reserved_gb), beside the estimate's 'reserved' (its total without
the CUDA context); a CUDA run adds the 8b_moe 4-layer slice of issue 20.
    python prepare_fineweb.py --corpus=stdlib --encoding=o200k_base:32768 --out_dir=data/mac_micro --val_tokens=100000
    python bench/memory.py                   # about 7 minutes on 2 CPU cores
    python bench/memory.py --device=cuda --gpu_check=True --results=memory.jsonl   # 3 rows, about a minute on an H200
"""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the project's files live one folder up

data_dir = "data/mac_micro"
device = "cpu"
iters = 3
only = ""  # measure only the configs whose name contains this
lora_base = ""  # a mac_micro checkpoint (out_dir): adds the LoRA fine-tune row, with it as init_from
gpu_check = False  # only the three rows the GPU check runs: mac_micro, its whole logits, the 8b_moe slice
results = ""  # a .jsonl file: one line per row as it finishes (config, estimate_gb, measured_gb, ratio)

MAC_MICRO = dict(n_layer=6, n_embd=384, n_head=6, n_kv_head=2, head_dim=64, n_expert=8, experts_per_token=2,
                 intermediate_size=768, vocab_size=32832, tie_embeddings=True, block_size=512, batch_size=4,
                 grad_accum_steps=8)
def from_file(name, **override):
    """A config file's shape, as train.py would read it."""
    import runpy

    s = runpy.run_path(os.path.join(ROOT, "config", name))
    return {**{k: s[k] for k in (*MAC_MICRO, "grad_accum_steps", "activation_checkpointing", "loss_chunk") if k in s}, **override}


CONFIGS = {
    "mac_micro (batch 4 x 512, 8 accumulation steps)": MAC_MICRO,
    "mac_micro, no accumulation": {**MAC_MICRO, "grad_accum_steps": 1},
    "mac_micro, batch 8 x 4": {**MAC_MICRO, "batch_size": 8, "grad_accum_steps": 4},
    "mac_micro, batch 2 x 1024": {**MAC_MICRO, "batch_size": 2, "block_size": 1024},
    "mac_micro, whole logits (loss_chunk=0)": {**MAC_MICRO, "loss_chunk": 0},
    "mac_micro, activation checkpointing, batch 8": {**MAC_MICRO, "batch_size": 8, "activation_checkpointing": True},
    "4 layers x 512, 4 experts of 1024, untied, batch 4 x 256": dict(n_layer=4, n_embd=512, n_head=8, n_kv_head=2, head_dim=64, n_expert=4,
                                                                    experts_per_token=2, intermediate_size=1024, vocab_size=32832,
                                                                    tie_embeddings=False, block_size=256, batch_size=4),
    "8 layers x 256, 16 experts top-4, batch 8 x 256": dict(n_layer=8, n_embd=256, n_head=4, n_kv_head=1, head_dim=64, n_expert=16,
                                                           experts_per_token=4, intermediate_size=256, vocab_size=32832,
                                                           tie_embeddings=True, block_size=256, batch_size=8),
    "config/mac_light.py (batch 4 x 512, 8 accumulation steps)": from_file("mac_light.py"),
    "config/mac_standard.py (batch 4 x 512, 8 accumulation steps)": from_file("mac_standard.py"),
}
# too big for a CPU run: 1B parameters (issue 20's row: torchrun --nproc_per_node=1 gives the same single process)
CUDA_CONFIGS = {"config/8b_moe.py, 4 layers, vocabulary 32832 (activation checkpointing, batch 4 x 4096, 2 accumulation steps)":
                from_file("8b_moe.py", n_layer=4, vocab_size=32832, grad_accum_steps=2)}
GPU_CHECK = ("mac_micro (batch 4 x 512, 8 accumulation steps)", "mac_micro, whole logits (loss_chunk=0)", *CUDA_CONFIGS)


def measure(settings, out):
    args = [f"--{k}={v}" for k, v in settings.items()]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args, f"--data_dir={data_dir}", f"--out_dir={out}", f"--max_iters={iters}",
           f"--eval_interval={iters}", "--eval_iters=2", "--sample_every=0", "--compile=False", f"--device={device}",
           "--save_every=1000000", "--log_interval=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"bench/memory.py: train.py failed: {p.stderr.read()[-2000:]}")
    if device.startswith("cuda"):
        with open(os.path.join(out, "heartbeat.json")) as f:
            return json.load(f)["max_memory_reserved_gb"] * 1e9
    return usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def main():
    from configurator import configure
    from model import GPTConfig
    from sizing import memory_estimate

    configure(globals())
    cuda = device.startswith("cuda")
    dt = "bfloat16" if cuda else "float32"
    print(f"| config | estimate (GB) | measured peak{' reserved' if cuda else ''} (GB) | estimate / measured |\n| --- | --- | --- | --- |")
    if lora_base:
        lora = {**MAC_MICRO, "lora_rank": 8, "init_from": lora_base}
        CONFIGS["mac_micro, LoRA rank 8 on q,k,v,o,experts (frozen base)"] = lora
        CONFIGS["LoRA, batch 8 x 512, no accumulation (config/finetune_mac.py's shape)"] = {**lora, "batch_size": 8, "grad_accum_steps": 1}
        CONFIGS["LoRA, batch 2 x 1024"] = {**lora, "batch_size": 2, "block_size": 1024}
        CONFIGS["LoRA, batch 8 x 512, base_dtype bfloat16"] = {**lora, "batch_size": 8, "grad_accum_steps": 1, "base_dtype": "bfloat16"}
    if cuda:
        CONFIGS.update(CUDA_CONFIGS)
    for name, s in ((n, s) for n, s in CONFIGS.items() if only in n and (n in GPU_CHECK or not gpu_check)):
        cfg = GPTConfig.from_dict(s)
        est = memory_estimate(cfg, s["batch_size"], s["block_size"], dt, 1, device.split(":")[0],
                              s.get("activation_checkpointing", False), s.get("loss_chunk", 512), s.get("grad_accum_steps", 1),
                              base_dtype=s.get("base_dtype", "float32"))
        est = est["reserved"] if cuda else est["total"]  # the allocator's reservation has no CUDA context in it
        with tempfile.TemporaryDirectory() as out:
            got = measure(s, out)
        print(f"| {name} | {est / 1e9:.2f} | {got / 1e9:.2f} | {est / got:.2f} |", flush=True)
        if results:
            with open(results, "a") as f:
                f.write(json.dumps({"config": name, "device": device, "estimate_gb": est / 1e9, "measured_gb": got / 1e9,
                                    "ratio": est / got}) + "\n")


if __name__ == "__main__":
    from configurator import run

    run(main)
