import os

# Tests run on the CPU even where a GPU is visible, unless a test asks otherwise.
os.environ.setdefault("MINDSPEED_LORA_DEVICE", "cpu")
os.environ.setdefault("PYTHONWARNINGS", "ignore")
