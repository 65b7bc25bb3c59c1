"""PPO configuration: the seed's ``training_rlhf_ppo.yaml`` keys as they are, plus documented extras.

The seed puts every PPO and optimizer knob under ``rlhf:`` and the prompt files under ``data:``;
the ``checkpoint:``, ``logging:`` and ``parallel:`` sections mean what they mean for SFT. Models
come from checkpoints, never from a ``model:`` section: the architecture of each is the
``model_config.json`` saved beside its weights (every trainer checkpoint and converted HF model
carries one), so the reward model may be a different size from the policy.

Batch arithmetic (whole job, like the seed): ``batch_size`` rollouts per PPO step are generated,
each data-parallel rank its ``batch_size / DP`` share; every ``ppo_epochs`` pass over them takes
optimizer steps of ``mini_batch_size`` rollouts, each made of ``gradient_accumulation_steps``
micro-batches per data-parallel rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...engine.config import (
    CheckpointSection,
    LoggingSection,
    LoraKeys,
    OptimConfig,
    TrainConfigError,
    choice,
    optim_view,
    require,
    validate_lora_keys,
    validate_optim,
)
from ...parallel.layout import ParallelLayout

# The seed's / TRL's names and ours for the per-token KL estimators of kernels.kl_penalty.
KL_PENALTY_NAMES = {"kl": "k1", "k1": "k1", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@dataclass
class RLHFSection(LoraKeys, OptimConfig):
    """PPO's keys. The optimizer keys (learning_rate, min_learning_rate, lr_scheduler,
    warmup_steps, weight_decay, adam_*, gradient_clipping, mixed_precision,
    use_distributed_optimizer, seed) are :class:`OptimConfig`'s; only PPO's defaults differ.
    The LoRA keys (use_peft, lora_r, ...) are :class:`LoraKeys`': adapters on the policy, whose
    reference is then the policy with its adapters off (one copy of the base weights)."""

    # Models: torch_dist checkpoints (a run dir, its best / latest marker, iter_x or iter_x/model).
    policy_model: str | None = None
    reference_model: str | None = None  # null: the policy's initial weights
    reward_model: str | None = None  # a reward-model checkpoint (reward_model.json beside it)
    value_model: str | None = None  # null: a value head on the policy trunk

    # Optimizer defaults for RL (policy; a separate value model uses value_learning_rate).
    learning_rate: float = 1.0e-6
    value_learning_rate: float | None = None
    lr_scheduler: str = choice("constant", "constant", "cosine", "linear")
    warmup_steps: int = 0  # optimizer steps
    weight_decay: float = 0.0
    gradient_accumulation_steps: int = 1

    # PPO.
    batch_size: int = 128  # rollouts per PPO step (whole job)
    mini_batch_size: int = 32  # rollouts per optimizer step (whole job)
    ppo_epochs: int = 4
    clip_range: float = 0.2
    clip_range_vf: float | None = 0.2  # value prediction clipped around the rollout's values
    kl_penalty: str = choice("kl", *KL_PENALTY_NAMES)
    kl_coef: float = 0.1
    target_kl: float | None = 0.01  # adaptive KL controller target; null: kl_coef stays fixed
    kl_horizon: int = 10000
    vf_coef: float = 1.0
    vf_clip_range: float | None = 10.0  # values and returns clamped to +-this
    entropy_coef: float = 0.01
    gamma: float = 1.0
    lam: float = 0.95
    reward_clip: float | None = 10.0  # normalised reward-model scores clamped to +-this
    # Subtracted from the (normalised, clipped) score of a response cut at max_new_tokens, i.e.
    # one that ends without any of the tokenizer's stop tokens; null or 0: off.
    missing_eos_penalty: float | None = None
    # The reward model scores a response that ended on another stop token (<|user|>,
    # <|observation|>) as if it had ended on <|endoftext|>, the token its training sequences end
    # with; the policy's log-probs keep the token it generated.
    score_stops_as_eos: bool = True
    whiten_advantages: bool = True
    # An epoch stops early when approx_kl (policy vs rollout policy) exceeds factor x target_kl.
    approx_kl_stop_factor: float | None = 10.0

    # Schedule.
    max_steps: int = 5000
    save_steps: int | None = None  # alias of checkpoint.save_steps
    eval_steps: int = 100
    eval_at_start: bool = True  # validation reward before the first update (the "before" number)

    # Generation.
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    rollout_micro_batch_size: int | None = None  # scoring micro-batch per rank; null: training's

    # Frozen models (reference, reward) move to CPU memory between uses.
    offload_reference: bool = False
    offload_reward_model: bool = False


@dataclass
class PromptDataSection:
    # Tokenized prompts (tools/tokenize_data.py --format prompts), or a raw JSONL/JSON prompt
    # file rendered with the policy's chat template at start (needs tokenizer_path).
    prompt_data_path: str | None = None
    validation_prompt_path: str | None = None
    # Raw prompt files are tokenized with it; sample text in the logs. null: the data's tokenizer.
    tokenizer_path: str | None = None
    max_prompt_length: int = 1024  # longer prompts are skipped (counted and reported)
    max_validation_prompts: int = 256
    shuffle: bool = True


@dataclass
class PPOCheckpointSection(CheckpointSection):
    output_dir: str = "output/ppo"


@dataclass
class PPOLoggingSection(LoggingSection):
    log_interval: int = 1
    num_samples_to_log: int = 4  # prompt + response pairs logged as text every eval_steps


@dataclass
class PPOConfig:
    rlhf: RLHFSection = field(default_factory=RLHFSection)
    data: PromptDataSection = field(default_factory=PromptDataSection)
    checkpoint: PPOCheckpointSection = field(default_factory=PPOCheckpointSection)
    logging: PPOLoggingSection = field(default_factory=PPOLoggingSection)
    parallel: ParallelLayout = field(default_factory=ParallelLayout)

    def to_dict(self) -> dict:
        import dataclasses

        return dataclasses.asdict(self)

    def validate(self) -> None:
        validate_ppo(self)

    @property
    def kl_type(self) -> str:
        return KL_PENALTY_NAMES[self.rlhf.kl_penalty]

    def optim(self, value: bool = False) -> OptimConfig:
        """The engine's optimizer settings for the policy, or for the separate value model."""
        r = self.rlhf
        if not value:
            return optim_view(r)
        lr = r.value_learning_rate or r.learning_rate
        return optim_view(r, learning_rate=lr, min_learning_rate=min(r.min_learning_rate, lr))


def validate_ppo(cfg: PPOConfig) -> None:
    r, d, c = cfg.rlhf, cfg.data, cfg.checkpoint
    for key in ("policy_model", "reward_model"):
        require(getattr(r, key), f"rlhf.{key} is not set (a torch_dist checkpoint directory)")
    require(d.prompt_data_path, "data.prompt_data_path is not set")
    validate_optim(r, "rlhf")
    validate_lora_keys(r, "rlhf")
    require(not (r.use_peft and r.reference_model), "rlhf.reference_model: with rlhf.use_peft "
            "the reference is the policy with its adapters off; leave reference_model unset")
    require(r.value_learning_rate is None or r.value_learning_rate > 0,
            "rlhf.value_learning_rate must be > 0 or null")
    require(r.value_learning_rate is None or r.value_model,
            "rlhf.value_learning_rate needs a separate rlhf.value_model (a value head on the policy "
            "trunk trains with the policy's learning rate)")
    require(r.gradient_accumulation_steps >= 1, "rlhf.gradient_accumulation_steps must be >= 1")
    require(r.gradient_clipping >= 0, "rlhf.gradient_clipping must be >= 0 (0 disables it)")
    require(r.batch_size >= 1 and r.mini_batch_size >= 1,
            "rlhf.batch_size and rlhf.mini_batch_size must be >= 1")
    require(r.batch_size % r.mini_batch_size == 0,
            f"rlhf.batch_size {r.batch_size} is not a multiple of rlhf.mini_batch_size "
            f"{r.mini_batch_size}")
    require(r.ppo_epochs >= 1, "rlhf.ppo_epochs must be >= 1")
    require(0 < r.clip_range < 1, "rlhf.clip_range must be in (0, 1)")
    require(r.clip_range_vf is None or r.clip_range_vf > 0, "rlhf.clip_range_vf must be > 0 or null")
    require(r.kl_coef >= 0, "rlhf.kl_coef must be >= 0")
    require(r.target_kl is None or r.target_kl > 0, "rlhf.target_kl must be > 0 or null")
    require(r.kl_horizon >= 1, "rlhf.kl_horizon must be >= 1")
    require(r.vf_coef >= 0 and r.entropy_coef >= 0, "rlhf.vf_coef and rlhf.entropy_coef must be >= 0")
    require(r.vf_clip_range is None or r.vf_clip_range > 0, "rlhf.vf_clip_range must be > 0 or null")
    require(0 <= r.gamma <= 1 and 0 <= r.lam <= 1, "rlhf.gamma and rlhf.lam must be in [0, 1]")
    require(r.reward_clip is None or r.reward_clip > 0, "rlhf.reward_clip must be > 0 or null")
    require(r.missing_eos_penalty is None or r.missing_eos_penalty >= 0,
            "rlhf.missing_eos_penalty must be >= 0 or null")
    require(r.approx_kl_stop_factor is None or r.approx_kl_stop_factor > 0,
            "rlhf.approx_kl_stop_factor must be > 0 or null")
    require(r.max_steps >= 1, "rlhf.max_steps must be >= 1")
    require(r.save_steps is None or r.save_steps >= 1, "rlhf.save_steps must be >= 1")
    require(r.eval_steps >= 1, "rlhf.eval_steps must be >= 1")
    require(r.max_new_tokens >= 1, "rlhf.max_new_tokens must be >= 1")
    require(r.temperature > 0, "rlhf.temperature must be > 0 (log-probs are taken at it)")
    require(0 < r.top_p <= 1, "rlhf.top_p must be in (0, 1]")
    require(r.top_k >= 0, "rlhf.top_k must be >= 0 (0 disables it)")
    require(r.rollout_micro_batch_size is None or r.rollout_micro_batch_size >= 1,
            "rlhf.rollout_micro_batch_size must be >= 1 or null")
    require(d.max_prompt_length >= 1, "data.max_prompt_length must be >= 1")
    require(d.max_validation_prompts >= 1, "data.max_validation_prompts must be >= 1")
    # One interval, two spellings (the seed has both rlhf.save_steps and checkpoint.save_steps).
    steps = {v for v in (r.save_steps, c.save_steps, c.checkpoint_interval) if v is not None}
    require(len(steps) <= 1, "rlhf.save_steps, checkpoint.save_steps and "
            "checkpoint.checkpoint_interval disagree (they are aliases)")
    require(c.save_strategy != "epoch", "checkpoint.save_strategy: 'epoch' has no meaning for PPO; "
            "use 'steps' or 'no'")
    require(c.save_strategy != "steps" or steps,
            "checkpoint.save_strategy is 'steps' but no rlhf.save_steps / checkpoint.save_steps is set")
    require(c.save_total_limit is None or c.save_total_limit >= 1,
            "checkpoint.save_total_limit must be >= 1 or null")
    require(cfg.logging.log_interval >= 1, "logging.log_interval must be >= 1")
    require(cfg.logging.num_samples_to_log >= 0, "logging.num_samples_to_log must be >= 0")


def ppo_save_interval(cfg: PPOConfig) -> int | None:
    c = cfg.checkpoint
    return cfg.rlhf.save_steps or c.save_steps or c.checkpoint_interval


@dataclass(frozen=True)
class PPOBatchPlan:
    """Per data-parallel rank: rollouts per step, per mini-batch, and the micro-batch size."""

    data_parallel_size: int
    rollouts_per_rank: int
    mini_batch_per_rank: int
    micro_batch_size: int
    gradient_accumulation_steps: int

    @property
    def mini_batches_per_epoch(self) -> int:
        return self.rollouts_per_rank // self.mini_batch_per_rank


def resolve_ppo_batch(cfg: PPOConfig, data_parallel_size: int) -> PPOBatchPlan:
    r, dp = cfg.rlhf, data_parallel_size
    if r.batch_size % dp or r.mini_batch_size % dp:
        raise TrainConfigError(
            f"rlhf.batch_size {r.batch_size} and rlhf.mini_batch_size {r.mini_batch_size} must be "
            f"multiples of the data-parallel size {dp}")
    mini = r.mini_batch_size // dp
    ga = r.gradient_accumulation_steps
    if mini % ga:
        raise TrainConfigError(
            f"rlhf.mini_batch_size / data-parallel size = {mini} rollouts per rank is not a multiple "
            f"of rlhf.gradient_accumulation_steps {ga}")
    return PPOBatchPlan(dp, r.batch_size // dp, mini, mini // ga, ga)
