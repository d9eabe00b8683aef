"""Generate text with a Megatron checkpoint (or HF dir), optionally with a LoRA adapter: greedy, sampling,
beam search, or interactive chat. Launch with torchrun for tensor parallelism; see docs/flags.md."""
from mindspeed_lora.inference.runner import main

if __name__ == "__main__":
    main()
