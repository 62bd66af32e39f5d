"""One FSDP2 step equals the unsharded step: run by tests/distributed/test_fsdp.py through
`accelerate launch --config_file accelerate_configs/fsdp.yaml tests/distributed/fsdp_one_step.py KIND:MODEL_DIR ...`
(KIND: causal or classify). For each model: prepare it with FSDP2, take one SGD step on a batch shared out over the
processes, and compare every weight with the same step taken on the unsharded model; prints `same step: SPEC`."""

from __future__ import annotations

import sys
from functools import partial

import torch


def check_one_step(accelerator, spec: str) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from finetune.core.fsdp import prepare_fsdp

    kind, path = spec.split(":", 1)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, **({} if kind == "causal" else {"num_labels": 3}))
    model.eval()  # no dropout: the sharded and unsharded forwards see the same network
    tied = model.config.tie_word_embeddings and model.get_output_embeddings() is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    prepare_fsdp(accelerator, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight

    full = partial(get_model_state_dict, options=StateDictOptions(full_state_dict=True))
    with torch.device("cpu"):
        reference = auto.from_config(model.config)
    reference.load_state_dict({name: t.cpu() for name, t in full(model).items()})
    reference.eval()
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=1.0)

    rows, generator = 2 * accelerator.num_processes, torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, model.config.vocab_size, (rows, 12), generator=generator)
    labels = input_ids if kind == "causal" else torch.randint(0, 3, (rows,), generator=generator)
    batch = {"input_ids": input_ids, "labels": labels}
    share = slice(accelerator.process_index, None, accelerator.num_processes)
    mine = {name: t[share].to(accelerator.device) for name, t in batch.items()}
    accelerator.backward(model(**mine).loss)  # the mean over equal shares: gradients averaged over processes
    optimizer.step()
    reference(**batch).loss.backward()
    reference_optimizer.step()

    after = {name: t.cpu() for name, t in full(model).items()}
    expected = reference.state_dict()
    assert after.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    if tied:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"same step: {spec}", flush=True)


if __name__ == "__main__":
    from accelerate import Accelerator

    accelerator = Accelerator()  # before from_pretrained: under FSDP it loads the fresh head on meta off rank 0
    for spec in sys.argv[1:]:
        check_one_step(accelerator, spec)
    accelerator.end_training()
