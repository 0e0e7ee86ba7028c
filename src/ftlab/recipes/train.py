"""``ftlab train CONFIG``: one config, one model, one method, one output folder.

The output folder appears only when everything worked: the data is validated and tokenized before anything is
written, training happens in a temporary folder beside it, and that folder is renamed to ``<dir>`` at the end
(``ftlab.atomic.replace_dir``). It holds
``model/`` (Hugging Face format, safetensors; for LoRA only with ``output.merge_lora``), ``adapter/`` (LoRA only,
a PEFT adapter), ``config.yaml`` (the resolved config), ``train_log.json`` (with ``eval_loss`` entries when
``data.validation`` holds records out) and, when ``train.report_to`` names tensorboard, ``tb/`` (its event files).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import yaml

from ftlab.atomic import replace_dir, write_json
from ftlab.config import ConfigError, RunConfig, to_dict
from ftlab.data import check_columns, sft_dataset
from ftlab.data.sources import hold_out, load_train_data
from ftlab.loading import check_device, check_method
from ftlab.memory import announce
from ftlab.methods import method_config
from ftlab.models import load_model, load_tokenizer, save_model
from ftlab.train.sft import TrainResult, train_sft


def run_train(cfg: RunConfig) -> tuple[Path, TrainResult]:
    """Validate, train, save. Returns the output folder and the training result."""
    out = Path(cfg.output.dir)
    if out.exists() and not cfg.output.overwrite:
        raise ConfigError(f"output.dir: {out} already exists (set output.overwrite=true to replace it)")
    if not cfg.data.train:
        raise ConfigError("data.train: no training data given")
    if cfg.train.trainer != "sft":
        raise ConfigError(
            f"train.trainer: `ftlab train` runs sft; {cfg.train.trainer!r} runs as a stage of `ftlab run`"
        )
    method_config(cfg.method.name, cfg.method.params)
    check_columns(cfg.data.columns, "data.columns")
    check_method(cfg.load, cfg.method.name)  # a quantized base trains only LoRA: refused before any weight loads
    check_device(cfg.load)
    if cfg.load.quantized and cfg.output.merge_lora:
        raise ConfigError(
            "output.merge_lora: merging into a quantized base would round the adapter into its 4/8-bit weights; "
            "save the adapter and merge it later on an unquantized base (ftlab eval/edit take the adapter folder)"
        )

    tokenizer = load_tokenizer(cfg.model, cfg.load)
    data = cfg.data
    records, fmt = load_train_data(data.train, data.format, data.limit, data.split, data.columns)
    if data.context_indicator:  # the context-dependency indicator (ftlab.data.context)
        from ftlab.data.context import add_context_indicator

        records = add_context_indicator(records, fmt)
    records, held = hold_out(records, data.validation, cfg.train.seed, fmt, data.columns)
    dataset = sft_dataset(records, fmt, tokenizer, data.max_length, data.truncate)
    eval_dataset = sft_dataset(held, fmt, tokenizer, data.max_length, data.truncate) if held else None

    # trackers (train.report_to) log under the output folder's name, tensorboard to <dir>/tb (ftlab.trackers)
    train = dataclasses.replace(cfg.train, run_name=cfg.train.run_name or out.resolve().name)
    announce(
        cfg.model, cfg.load, cfg.method.name, cfg.method.params, train, data.max_length,
        title=f"memory plan: {cfg.method.name} on {cfg.model}",
    )  # fmt: skip
    model, tokenizer = load_model(cfg.model, settings=cfg.load)
    with replace_dir(out) as partial:
        result = train_sft(
            model, tokenizer, dataset, cfg.method, train, partial / "work", max_length=data.max_length,
            eval_dataset=eval_dataset,
        )  # fmt: skip
        if cfg.method.name == "lora":
            result.model.save_pretrained(partial / "adapter", safe_serialization=True)
            tokenizer.save_pretrained(partial / "adapter")
        if cfg.method.name != "lora" or cfg.output.merge_lora:
            save_model(result.final_model(), tokenizer, partial / "model")
        shutil.rmtree(partial / "work", ignore_errors=True)
        (partial / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        log: dict[str, Any] = {
            "steps": result.steps,
            "train_records": len(records),
            "eval_records": len(held),
            "train_seconds": result.train_seconds,
            "trainable_params": result.trainable_params,
            "optimizer_state_bytes": result.optimizer_state_bytes,
            "plan_info": result.plan_info,
            "log_history": result.log_history,
        }
        write_json(partial / "train_log.json", log)
    return out, result
