"""``python -m mindspeed_lora.patches``: print the patches that would apply on this machine, and why."""
from mindspeed_lora.patches.registry import describe

if __name__ == "__main__":
    print(describe())
