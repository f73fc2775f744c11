"""Run under `accelerate launch --config_file launch/ddp.yaml --num_processes 2`: checks that
the accelerator clustertune builds really synchronises gradients (on a CPU-only
machine a MULTI_GPU launch file otherwise trains each rank alone, silently)."""

import torch

from clustertune.distributed import DDPStepper, build_accelerator

accelerator = build_accelerator(ds_config=None, dtype="fp32", project_dir=".", report_to=[])
torch.manual_seed(0)  # same init on every rank
model = torch.nn.Linear(4, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
model, optimizer = accelerator.prepare(model, optimizer)
stepper = DDPStepper(accelerator, model, optimizer, scheduler, max_grad_norm=0.0)
rank = accelerator.process_index
x = torch.full((3, 4), float(rank + 1))  # different data on each rank
with stepper.micro_step(True):
    stepper.backward(model(x).pow(2).mean(), True)
stepper.optimizer_step()
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = accelerator.gather(flat.unsqueeze(0))
if accelerator.is_main_process:
    print(
        f"distributed_type={accelerator.distributed_type} num_processes={accelerator.num_processes}"
    )
    print(f"max_param_difference={float((gathered[0] - gathered[1]).abs().max())}")
# Leave the process group cleanly: exiting with gloo's threads still running can end the
# process in std::terminate ("terminate called without an active exception", SIGABRT).
accelerator.wait_for_everyone()
torch.distributed.destroy_process_group()
