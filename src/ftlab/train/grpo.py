"""Reinforcement fine-tuning (GRPO) through TRL's GRPOTrainer, with rule-based rewards and RIF-RFT filtering.

The method's Plan is applied exactly as in ``train_sft`` (get_method -> plan -> apply_plan, the plan's optimizer and
callbacks), so every method trains under GRPO the same way it trains under SFT. Prompts go through the chat template
(TRL's conversational prompt format); each ``verifiable`` record is scored by the reward it names
(``ftlab.train.rewards``).

Paper settings (docs/methods.md, "GRPO"; Lai et al., "Reinforcement Fine-Tuning Naturally Mitigates Forgetting in
Continual Post-Training", arXiv 2507.05386) and where we differ:

- KL: ``beta`` defaults to **0.01**, the RFT paper's ``kl_coef`` (TRL's default is 0, no KL). TRL's KL term is the
  same k3 estimator ``exp(ref - logp) - (ref - logp) - 1``. Called directly, the reference is the model *as it was
  when this stage started* (a frozen copy; for PEFT methods the adapters are switched off instead) unless
  ``ref_model`` is given. In ``ftlab run`` the ``reference`` setting decides: ``base`` (default) anchors every stage
  to the run's base model, as the RFT-forgetting paper's continual runs do (one reference for all tasks);
  ``stage_start`` anchors each stage to the model it starts from.
- Rollouts: ``num_generations`` 4 and ``max_completion_length`` 16 are small-model defaults; the paper uses 8
  rollouts, temperature 1.0, top_p 0.99, 1024 tokens.
- Batches: ``train.batch_size`` counts *completions* per device step (TRL's convention), so a step sees
  ``batch_size * grad_accum / num_generations`` prompts; that product must divide by ``num_generations``.
- RIF-RFT (rollout-based instance filtering): before training, sample ``rif_rollouts`` completions per prompt from the
  current model (temperature ``temperature``), drop prompts with 0 correct, keep the rest. Prompts with every rollout
  correct are kept, as in the released ``rollout_filter.py``; whether the paper also drops them is unconfirmed
  (``rif_keep_all_correct=False`` drops them too). "Correct" means the record's accuracy reward ``>= rif_threshold``.
- Inner training phases of a method (``PlanContext.train_phase``) run GRPO on this stage's prompts too, and the
  calibration data a method sees (``PlanContext.train_dataset``) is SFT-tokenized ``prompt -> answer`` pairs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback, set_seed
from trl import GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from ftlab.config import ConfigError, TrainConfig
from ftlab.data.records import WHERE, DataError, first_answer
from ftlab.train.reference import check_reference, train_against_reference
from ftlab.train.rewards import REWARDS, format_reward, get_reward, score
from ftlab.train.sft import TrainResult
from ftlab.train.stage import StageJob
from ftlab.train.trainer_args import base_trainer_kwargs, trainer_inputs

RolloutFn = Callable[[list[Any], int], list[list[str]]]  # (prompts, n) -> n completions per prompt


@dataclass
class GRPOSettings:
    num_generations: int = 4  # G: completions sampled per prompt (RFT paper 8, CLS-RL 4)
    max_completion_length: int = 16  # new tokens per completion; raise for reasoning tasks (paper: 1024)
    beta: float = 0.01  # KL coefficient to the reference; RFT paper kl_coef 0.01 (TRL default 0 = no KL)
    temperature: float = 1.0  # sampling temperature of the rollouts
    top_p: float = 1.0  # nucleus sampling (paper: 0.99)
    reward: str = "exact"  # reward for records without a "reward" field (any name in ftlab.train.rewards.REWARDS)
    format_weight: float = 0.0  # w in (1 - w) * accuracy + w * format (EasyR1: 0.1 with its \boxed format)
    loss_type: str = "dapo"  # TRL loss aggregation; "dapo" = token mean over the batch, like EasyR1's token-mean
    system_prompt: str | None = None  # optional system message before every prompt
    rif_filter: bool = False  # RIF-RFT: drop prompts the current model never solves in rif_rollouts samples
    rif_rollouts: int = 8  # samples per prompt for the filter (paper: 8)
    rif_threshold: float = 1.0  # a rollout is correct when its accuracy reward >= this
    rif_keep_all_correct: bool = True  # keep prompts solved in every rollout (released script keeps them)
    rif_batch_size: int = 16  # prompts per generation batch in the filter
    reference: str = "base"  # KL anchor in `ftlab run`: base (the run's base model) or stage_start

    def __post_init__(self) -> None:
        check_reference(self.reference, "grpo")
        if self.num_generations < 2:
            raise ConfigError(f"grpo.num_generations must be >= 2 (group advantages), got {self.num_generations}")
        if not 0 <= self.beta < float("inf"):  # also refuses NaN
            raise ConfigError(f"grpo.beta must be >= 0 and finite, got {self.beta}")
        if not 0.0 <= self.format_weight <= 1.0:
            raise ConfigError(f"grpo.format_weight must be in [0, 1], got {self.format_weight}")
        if self.rif_rollouts < 1:
            raise ConfigError(f"grpo.rif_rollouts must be >= 1, got {self.rif_rollouts}")


def prompt_of(record: dict[str, Any], tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> Any:
    """The prompt in TRL's format: a message list when the tokenizer has a chat template, else the raw text."""
    if tokenizer.chat_template is None:
        return (system_prompt + "\n\n" if system_prompt else "") + record["prompt"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": record["prompt"]}]


def grpo_dataset(records: list[dict[str, Any]], tokenizer: PreTrainedTokenizerBase, grpo: GRPOSettings) -> Dataset:
    """Rows ``{"prompt", "answer": list[str], "reward": name}`` for GRPOTrainer; unknown reward names fail early.

    Args:
        records: ``verifiable`` records.
        tokenizer: the model's tokenizer (decides chat vs plain prompts).
        grpo: settings (default reward, system prompt).

    Returns:
        The dataset.
    """
    rows = []
    for i, r in enumerate(records):
        where = r.get(WHERE, f"record {i}")
        if "prompt" not in r or "answer" not in r:
            raise DataError(f"{where}: GRPO needs verifiable records with 'prompt' and 'answer'")
        name = r.get("reward") or grpo.reward
        if name not in REWARDS:
            raise DataError(f"{where}: field 'reward' names {name!r}; known rewards: {', '.join(sorted(REWARDS))}")
        answer = [r["answer"]] if isinstance(r["answer"], str) else list(r["answer"])
        rows.append({"prompt": prompt_of(r, tokenizer, grpo.system_prompt), "answer": answer, "reward": name})
    if not rows:
        raise DataError("GRPO: no training records")
    return Dataset.from_list(rows)


def _text(completion: Any) -> str:
    """A TRL completion (message list or string) as plain text."""
    return completion[-1]["content"] if isinstance(completion, list) else completion


def _reward_funcs(grpo: GRPOSettings) -> tuple[list[Callable[..., list[float]]], list[float]]:
    """TRL reward functions and weights: each record's accuracy reward, plus the format reward when weighted."""

    def accuracy(completions: list[Any], answer: list[list[str]], reward: list[str], **_: Any) -> list[float]:
        return [float(get_reward(n)(_text(c), a)) for c, a, n in zip(completions, answer, reward, strict=True)]

    def answer_format(completions: list[Any], answer: list[list[str]], **_: Any) -> list[float]:
        return [format_reward(_text(c), a) for c, a in zip(completions, answer, strict=True)]

    if grpo.format_weight == 0.0:
        return [accuracy], [1.0]
    return [accuracy, answer_format], [1.0 - grpo.format_weight, grpo.format_weight]


def sample_rollouts(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, grpo: GRPOSettings, seed: int = 0
) -> RolloutFn:
    """A rollout function that samples from ``model`` like GRPO does (temperature, top_p, completion length).

    Args:
        model: the policy to sample from.
        tokenizer: its tokenizer.
        grpo: sampling settings (``temperature``, ``top_p``, ``max_completion_length``, ``rif_batch_size``).
        seed: seeds the sampling.

    Returns:
        ``fn(prompts, n) -> [[completion] * n per prompt]``.
    """

    def rollouts(prompts: list[Any], n: int) -> list[list[str]]:
        out: list[list[str]] = []
        device = next(model.parameters()).device
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        was_training = model.training
        model.eval()
        try:
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                for start in range(0, len(prompts), grpo.rif_batch_size):
                    chunk = prompts[start : start + grpo.rif_batch_size]
                    texts = [_render(p, tokenizer) for p in chunk]
                    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    ids = model.generate(
                        **enc,
                        do_sample=True,
                        temperature=grpo.temperature,
                        top_p=grpo.top_p,
                        top_k=0,
                        max_new_tokens=grpo.max_completion_length,
                        num_return_sequences=n,
                        pad_token_id=tokenizer.pad_token_id,
                    )
                    texts = tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
                    out += [texts[i * n : (i + 1) * n] for i in range(len(chunk))]
        finally:
            tokenizer.padding_side = side
            model.train(was_training)
        return out

    return rollouts


def _render(prompt: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)


def rif_filter(
    records: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    rollout_fn: RolloutFn,
    grpo: GRPOSettings,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RIF-RFT: keep the prompts the current model solves at least once in ``grpo.rif_rollouts`` samples.

    Args:
        records: ``verifiable`` records.
        tokenizer: the model's tokenizer (prompt format).
        rollout_fn: ``fn(prompts, n)`` returning ``n`` completions per prompt (see :func:`sample_rollouts`).
        grpo: settings (rollouts, threshold, reward names, whether to keep all-correct prompts).

    Returns:
        ``(kept_records, info)``; ``info`` has the counts and the per-record number of correct rollouts.
    """
    n = grpo.rif_rollouts
    prompts = [prompt_of(r, tokenizer, grpo.system_prompt) for r in records]
    completions = rollout_fn(prompts, n)
    if len(completions) != len(records) or any(len(c) != n for c in completions):
        raise ValueError(f"rif_filter: the rollout function must return {n} completions for each of {len(records)}")
    correct = []
    for r, comps in zip(records, completions, strict=True):
        name = r.get("reward") or grpo.reward
        correct.append(sum(score(c, r["answer"], name) >= grpo.rif_threshold for c in comps))
    keep = [0 < c and (grpo.rif_keep_all_correct or c < n) for c in correct]
    kept = [r for r, k in zip(records, keep, strict=True) if k]
    info = {
        "rollouts": n,
        "total": len(records),
        "kept": len(kept),
        "dropped_unsolved": sum(c == 0 for c in correct),
        "dropped_all_correct": sum(c == n for c in correct) if not grpo.rif_keep_all_correct else 0,
        "correct_counts": correct,
    }
    return kept, info


def grpo_config(train: TrainConfig, grpo: GRPOSettings, work_dir: str | Path, **overrides: Any) -> GRPOConfig:
    """TRL GRPOConfig from our settings (beta is set on the trainer; see ``train_grpo``)."""
    per_step = train.batch_size * train.grad_accum
    if per_step % grpo.num_generations:
        raise ValueError(
            f"train.batch_size * train.grad_accum = {per_step} completions per step must be a multiple of "
            f"grpo.num_generations = {grpo.num_generations} (every prompt's group must fit in one step)"
        )
    kwargs = base_trainer_kwargs(train, work_dir)
    kwargs.update(
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        top_p=grpo.top_p,
        loss_type=grpo.loss_type,
        beta=0.0,  # TRL would rebuild the reference from the model's hub id; train_grpo installs its own instead
        reward_weights=_reward_funcs(grpo)[1],
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def _trainer(
    model: nn.Module,
    ref: nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    args: GRPOConfig,
    grpo: GRPOSettings,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> GRPOTrainer:
    """A GRPOTrainer whose KL reference is ``ref`` (None for a PEFT model: adapters off), weight ``grpo.beta``."""
    funcs, _ = _reward_funcs(grpo)
    inputs = trainer_inputs(dataset, tokenizer, optimizer, callbacks)
    trainer = GRPOTrainer(model=model, reward_funcs=funcs, args=args, **inputs)
    if not (hasattr(trainer, "beta") and hasattr(trainer, "ref_model")):
        raise RuntimeError("this TRL version's GRPOTrainer has no beta/ref_model attributes; ftlab needs TRL 1.x")
    # TRL builds its reference from the model's hub id (none for a model built in code, and the wrong weights after
    # an earlier stage), so it is constructed with beta=0 and given the stage's own frozen reference here.
    trainer.beta = trainer.args.beta = grpo.beta
    if grpo.beta and ref is not None:
        add_fused_lm_head(ref, temperature=grpo.temperature)
        trainer.ref_model = trainer.accelerator.prepare_model(ref, evaluation_mode=True)
    return trainer


def train_grpo(
    job: StageJob,
    ref_model: nn.Module | None = None,
    rollout_fn: RolloutFn | None = None,
    callbacks: list[TrainerCallback] | None = None,
) -> TrainResult:
    """Reinforcement fine-tuning with GRPO on ``verifiable`` records, with the job's method deciding what trains.

    Args:
        job: the policy (modified in place for non-PEFT methods), its tokenizer, the ``verifiable`` records
            (``prompt``, ``answer``, optional ``reward`` name), the method, training settings (``batch_size``
            counts completions, see the module docstring), checkpoint folder, ``GRPOSettings`` (default
            ``GRPOSettings()``), stage index and resume flag.
        ref_model: KL reference; None uses the model as it is now (before training).
        rollout_fn: sampler for the RIF filter; None samples from the model.
        callbacks: extra trainer callbacks.

    Returns:
        A TrainResult; ``plan_info["rif"]`` holds the filter's counts when it ran.
    """
    grpo = job.settings or GRPOSettings()
    model, tokenizer, records, train, work_dir = job.model, job.tokenizer, job.records, job.train, Path(job.work_dir)
    set_seed(train.seed)
    grpo_config(train, grpo, work_dir)  # a batch shape GRPO cannot use fails before any sampling
    rif_info = None
    if grpo.rif_filter:
        sampler = rollout_fn or sample_rollouts(model, tokenizer, grpo, seed=train.seed)
        records, rif_info = rif_filter(records, tokenizer, sampler, grpo)
        if not records:
            raise DataError(f"RIF filter dropped every prompt (0/{grpo.rif_rollouts} correct); nothing to train on")
    dataset = grpo_dataset(records, tokenizer, grpo)

    def make_trainer(policy: nn.Module, ref: nn.Module | None, folder: Path, overrides: dict, opt: Any, cbs: list):
        return _trainer(policy, ref, tokenizer, dataset, grpo_config(train, grpo, folder, **overrides), grpo, opt, cbs)

    job = dataclasses.replace(job, records=records)  # after the RIF filter
    return train_against_reference(
        job, make_trainer, lambda r: first_answer(r["answer"]), ref_model=ref_model, needs_reference=bool(grpo.beta),
        callbacks=callbacks, info={} if rif_info is None else {"rif": rif_info},
    )  # fmt: skip


def train_stage(job: StageJob) -> TrainResult:
    """``ftlab run``'s GRPO stage, its KL term anchored to the reference its ``reference`` setting names."""
    return train_grpo(job, ref_model=job.reference((job.settings or GRPOSettings()).reference))
