"""What every training loop shares: the resumable training state (state.py: seeds, EMA, checkpoints, resume, the NaN
check, the loss log), the machine a run happens on (hardware.py: device, precision, memory), what a run will hold
on the GPU, simulated without one (memsim.py, memory_plan.py), and torchrun data parallelism (ddp.py)."""
