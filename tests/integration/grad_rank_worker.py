"""Worker of test_npo.py::test_one_and_two_ranks_give_the_same_gradient: one optimizer update of a fixed batch,
split over the ranks of the job (1 process or torchrun), with the full gradient saved by rank 0.

    python grad_rank_worker.py CACHE_DIR RUN_DIR OUT.pt AGG
"""

import sys

import torch

from trainer_helpers import tiny_config


def main(cache_dir: str, run_dir: str, out: str, agg: str) -> None:
    from npo_engine import Trainer
    from npo_engine.trainer import TrainBatch

    trainer = Trainer(tiny_config(cache_dir, "run.steps=1", f"algo.loss_agg={agg}", "optim.micro_batch_size=3"),
                      run_dir=run_dir)
    gen = torch.Generator().manual_seed(0)
    rows = 8
    prompts = [torch.randint(3, 20, (4,), generator=gen).tolist() for _ in range(rows)]
    completions = [torch.randint(3, 20, (int(n),), generator=gen).tolist()
                   for n in torch.randint(1, 6, (rows,), generator=gen)]
    input_ids, attention_mask, completion_mask, _ = trainer._pad(prompts, completions)
    batch = TrainBatch(input_ids=input_ids, attention_mask=attention_mask, completion_mask=completion_mask,
                       behavior_logp=-torch.rand(input_ids.shape, generator=gen) * completion_mask,
                       rewards=torch.zeros(rows), group_ids=torch.arange(rows) // 4,
                       policy_id=torch.tensor([0, 0, 0, 1] * 2), replayed=torch.zeros(rows, dtype=torch.bool),
                       advantages=torch.randn(rows, generator=gen))
    share = rows // trainer.dist.world_size
    mine = batch.rows(trainer.dist.rank * share, (trainer.dist.rank + 1) * share)
    trainer.optimizer.step = lambda: None  # only the gradient is compared
    trainer._optimizer_update(mine)
    grads = {}
    for name, p in trainer.policy.named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name.replace("_fsdp_wrapped_module.", "")] = g.detach().cpu()
    if trainer.dist.is_main:
        torch.save(grads, out)
    trainer.close()


if __name__ == "__main__":
    main(*sys.argv[1:])
