"""``python -m fastvlm_mlx.lora``: LoRA, DoRA or full fine-tuning of FastVLM, with mlx_lm.lora's flags.

Flags, a ``-c config.yaml`` (for what has no flag: ``lr_schedule``, ``lora_parameters``, ``optimizer_config``)
and defaults combine as in mlx_lm.lora: a flag given wins over the file, the file over the defaults.  The
adapters (``adapters.safetensors``, ``adapter_config.json``) go to ``--adapter-path``; their keys are rooted at
the FastVLM model (``language_model.model.layers.N.self_attn.q_proj.lora_a``, ``projector.linear_1.weight``).
Training runs on MLX's own layers (the model is not given the Linux CPU layer), in float32 on the CPU.
"""

import json
import math
import sys
import types
from pathlib import Path

from .errors import FastVLMError, exit_on_user_error

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"

CONFIG_DEFAULTS = {
    "model": None,
    "data": None,
    "train": False,
    "test": False,
    "fine_tune_type": "lora",
    "train_mode": "sft",
    "beta": 0.1,
    "optimizer": "adam",
    "optimizer_config": {},
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": None,
    "epochs": None,
    "val_batches": 25,
    "test_batches": 500,
    "learning_rate": 1e-5,
    "lr_schedule": None,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "save_every": 100,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "max_seq_length": 2048,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": True,
    "image_folder": None,
    "skip_bad_lines": False,
    "train_projector": False,
    "train_vision": False,
    "feature_cache_size": 2048,
    "save_features": False,
    "quantize": False,
    "q_bits": 4,
    "q_group_size": 64,
}
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")
TRAIN_MODES = ("sft", "dpo")
DEFAULT_ITERS = 1000  # mlx_lm.lora's, when neither --iters nor --epochs is given


def options(given: dict, config_file: str | None = None) -> types.SimpleNamespace:
    """Flags given (None: not given) over the YAML file's values over CONFIG_DEFAULTS, as mlx_lm.lora does."""
    merged = {k: v for k, v in given.items() if v is not None}
    if config_file:
        import yaml
        from mlx_lm.lora import yaml_loader

        try:
            with open(Path(config_file).expanduser(), encoding="utf-8") as f:
                loaded = yaml.load(f, yaml_loader) or {}
        except OSError as e:
            raise FastVLMError(f"{config_file}: cannot read the config file ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise FastVLMError(f"{config_file}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(loaded, dict):
            raise FastVLMError(f"{config_file}: the config must be a mapping of option names to values")
        unknown = sorted(set(loaded) - set(CONFIG_DEFAULTS))
        if unknown:
            raise FastVLMError(f"{config_file}: unknown option {unknown[0]!r}")
        merged = {**loaded, **merged}
    return types.SimpleNamespace(**{**CONFIG_DEFAULTS, **merged})


def load_for_training(model_path: str, quantize: dict | None = None):
    """(model, processor) on MLX's own layers (never ``specialize``d), in float32 on the CPU (the checkpoint's
    dtype on a GPU); ``quantize`` ({"bits", "group_size"}) quantizes the decoder for QLoRA."""
    import mlx.core as mx
    import mlx.nn as nn

    from .checkpoints import read_checkpoint
    from .loader import build_model, default_dtype, resolve_path, stored_dtype
    from .processor import FastVLMProcessor

    path = resolve_path(model_path)
    config, weights = read_checkpoint(path)
    model = build_model(config, weights, str(path))
    model.set_dtype(default_dtype(stored_dtype(weights)))
    if quantize:
        try:
            nn.quantize(model.language_model, group_size=quantize["group_size"], bits=quantize["bits"])
        except ValueError as e:
            raise FastVLMError(f"cannot quantize the decoder ({e})") from None
    mx.eval(model.parameters())
    return model, FastVLMProcessor.from_pretrained(path, model.config)


def _optimizer(args, learning_rate):
    import mlx.optimizers as optim

    name = str(args.optimizer).lower()
    if name not in OPTIMIZERS:
        raise FastVLMError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {args.optimizer!r})")
    classes = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD}
    cls = classes.get(name, optim.Adafactor)
    return cls(learning_rate=learning_rate, **(args.optimizer_config or {}).get(name, {}))


def _check(args) -> None:
    if not args.model or not args.data:
        raise FastVLMError("give --model and --data (or set them in the -c config file)")
    if not (args.train or args.test):
        raise FastVLMError("give --train, --test or both")
    for name in ("batch_size", "steps_per_report", "steps_per_eval", "save_every", "max_seq_length"):
        if getattr(args, name) < 1:
            raise FastVLMError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    if args.iters is not None and args.epochs is not None:
        raise FastVLMError("give --iters or --epochs, not both")
    if args.train_mode not in TRAIN_MODES:
        raise FastVLMError(f"--train-mode must be {' or '.join(TRAIN_MODES)} (got {args.train_mode!r})")
    if not args.beta > 0:
        raise FastVLMError(f"--beta must be above 0 (got {args.beta})")
    if args.train_vision and args.quantize:
        raise FastVLMError("--train-vision with -q: the tower is not quantized, train it on an unquantized model")


def _saved_setup(args) -> None:
    """For --test without --train: what the adapters in --adapter-path were trained with."""
    path = Path(args.adapter_path) / CONFIG_FILE
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    for key in ("fine_tune_type", "num_layers", "lora_parameters", "train_projector", "train_vision", "train_mode"):
        if key in saved:
            setattr(args, key, saved[key])


def tune(args: types.SimpleNamespace, training_callback=None, report=None) -> dict:
    """Train and/or test as ``args`` say; returns what a caller may inspect (``model``, ``features``,
    ``splits``, ``test_loss``)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.trainer import TrainingArgs, evaluate, train
    from mlx_lm.tuner.utils import build_schedule

    from .tuning import preference
    from .tuning.data import load_splits, read_split
    from .tuning.trainer import (
        FEATURES_FILE,
        Batches,
        FeatureStore,
        image_input,
        load_trained,
        lora_keys,
        make_loss,
        make_trainable,
    )

    report = report or (lambda line: print(line, file=sys.stderr, flush=True))
    _check(args)
    adapter_path = Path(args.adapter_path).expanduser()
    if args.test and not args.train:
        _saved_setup(args)
    np.random.seed(args.seed)
    quantize = {"bits": args.q_bits, "group_size": args.q_group_size} if args.quantize else None
    model, processor = load_for_training(args.model, quantize)
    names = (("train", "valid") if args.train else ()) + (("test",) if args.test else ())
    dpo = args.train_mode == "dpo"
    splits = load_splits(
        args.data,
        processor,
        model.config.num_image_tokens,
        names,
        skip_bad_lines=args.skip_bad_lines,
        report=report,
        image_folder=args.image_folder,
        max_seq_length=args.max_seq_length,
        mask_prompt=args.mask_prompt,
        reader=preference.read_preference_split if dpo else read_split,
    )
    lora_parameters = None
    if args.fine_tune_type != "full":
        lora_parameters = {**CONFIG_DEFAULTS["lora_parameters"], **(args.lora_parameters or {})}
        lora_parameters["keys"] = lora_parameters.get("keys") or lora_keys(model)
    mx.random.seed(args.seed)  # the LoRA layers' initial A
    make_trainable(
        model, args.fine_tune_type, args.num_layers, lora_parameters, args.train_projector, args.train_vision
    )
    kind = image_input(args.train_projector, args.train_vision)
    features = FeatureStore(model, processor, kind, int(args.feature_cache_size) << 20)
    features_file = adapter_path / FEATURES_FILE
    reused = features.load(features_file)
    if reused:
        report(f"read the features of {reused} image(s) from {features_file}")
    save_features = (lambda: features.save(features_file)) if args.save_features else None
    result = {"model": model, "features": features, "splits": splits, "test_loss": None}
    if dpo:
        loss = preference.make_dpo_loss(kind, args.beta)
        batches = preference.PreferenceBatches(features, model.config.num_image_tokens, on_pass_end=save_features)
        for pairs in splits.values():  # the reference is the model before any adapter weights are loaded
            preference.set_references(model, pairs, batches, args.batch_size, kind)
    else:
        loss = make_loss(kind)
        batches = Batches(features, model.config.num_image_tokens, on_pass_end=save_features)

    def accuracy(split: str) -> None:
        if dpo:
            value = preference.reward_accuracy(model, splits[split], batches, args.batch_size, kind, args.beta)
            report(f"{split.capitalize()} reward accuracy {value:.3f}.")
            result[f"{split}_reward_accuracy"] = value

    if args.train:
        if args.resume_adapter_file:
            report(f"resuming from {args.resume_adapter_file}")
            load_trained(model, Path(args.resume_adapter_file).expanduser())
        train_set = splits["train"]
        iters = args.iters
        if args.epochs is not None:
            iters = args.epochs * math.ceil(len(train_set) / args.batch_size)
        iters = DEFAULT_ITERS if iters is None else iters
        if iters < 1:
            raise FastVLMError(f"--iters / --epochs must give at least one step (got {iters})")
        adapter_path.mkdir(parents=True, exist_ok=True)
        write_config(adapter_path / CONFIG_FILE, args, lora_parameters, quantize, iters)
        schedule = build_schedule(args.lr_schedule) if args.lr_schedule else args.learning_rate
        training = TrainingArgs(
            batch_size=args.batch_size,
            iters=iters,
            val_batches=args.val_batches,
            steps_per_report=args.steps_per_report,
            steps_per_eval=args.steps_per_eval,
            steps_per_save=args.save_every,
            max_seq_length=args.max_seq_length,
            adapter_file=adapter_path / ADAPTER_FILE,
            grad_checkpoint=args.grad_checkpoint,
            grad_accumulation_steps=args.grad_accumulation_steps,
        )
        try:
            train(
                model,
                _optimizer(args, schedule),
                train_set,
                splits["valid"],
                args=training,
                loss=loss,
                iterate_batches=batches,
                training_callback=training_callback,
            )
        finally:
            if save_features:
                save_features()
        accuracy("valid")
    elif args.test and (adapter_path / ADAPTER_FILE).is_file():
        load_trained(model, adapter_path / ADAPTER_FILE)

    if args.test:
        test_loss = evaluate(
            model,
            splits["test"],
            args.batch_size,
            args.test_batches,
            max_seq_length=args.max_seq_length,
            loss=loss,
            iterate_batches=batches,
        )
        if dpo:
            report(f"Test DPO loss {test_loss:.3f}.")
            accuracy("test")
        else:
            report(f"Test loss {test_loss:.3f}, Test ppl {math.exp(min(test_loss, 700)):.3f}.")
        result["test_loss"] = test_loss
    return result


def write_config(path: Path, args, lora_parameters: dict | None, quantize: dict | None, iters: int) -> None:
    """adapter_config.json: mlx-lm's fields, what FastVLM adds (train_projector, train_vision, model) and the
    run's settings."""
    config = {
        key: getattr(args, key)
        for key in CONFIG_DEFAULTS
        if key not in ("lora_parameters", "quantize", "q_bits", "q_group_size", "iters")
    }
    config.update(
        fine_tune_type=args.fine_tune_type,
        num_layers=args.num_layers,
        lora_parameters=lora_parameters,
        train_projector=bool(args.train_projector),
        train_vision=bool(args.train_vision),
        model=str(args.model),
        iters=iters,
        quantization=quantize,
    )
    path.write_text(json.dumps(dict(sorted(config.items())), indent=4, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    import typer

    from .cli import use_one_line_warnings

    use_one_line_warnings()
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    def flag(*names, help_text):
        return typer.Option(None, *names, help=help_text, show_default=False)

    @app.command(help="Fine-tune FastVLM (LoRA, DoRA or full) on a folder of JSONL conversations with images.")
    @exit_on_user_error
    def run(
        model: str | None = flag("--model", "-m", help_text="Model directory or Hugging Face repo id."),
        data: str | None = flag("--data", help_text="Folder with train.jsonl, valid.jsonl and test.jsonl."),
        train: bool | None = flag("--train", help_text="Train."),
        test: bool | None = flag("--test", help_text="Report the test set's loss (after training, if --train)."),
        fine_tune_type: str | None = flag("--fine-tune-type", help_text="lora (default), dora or full."),
        train_mode: str | None = flag(
            "--train-mode", help_text="sft (default) or dpo (preference pairs: prompt, chosen, rejected)."
        ),
        beta: float | None = flag("--beta", help_text="DPO's beta: how far from the base model (default 0.1)."),
        optimizer: str | None = flag("--optimizer", help_text=f"One of {', '.join(OPTIMIZERS)} (default adam)."),
        mask_prompt: bool | None = flag(
            "--mask-prompt/--no-mask-prompt", help_text="Loss on the assistant's tokens only (default on)."
        ),
        num_layers: int | None = flag("--num-layers", help_text="Decoder layers to tune, from the last (-1: all)."),
        batch_size: int | None = flag("--batch-size", help_text="Examples per step (default 4)."),
        iters: int | None = flag("--iters", help_text="Steps to train (default 1000)."),
        epochs: int | None = flag("--epochs", help_text="Passes over the training set (instead of --iters)."),
        val_batches: int | None = flag("--val-batches", help_text="Validation batches (-1: all; default 25)."),
        test_batches: int | None = flag("--test-batches", help_text="Test batches (-1: all; default 500)."),
        learning_rate: float | None = flag("--learning-rate", help_text="Learning rate (default 1e-5)."),
        steps_per_report: int | None = flag("--steps-per-report", help_text="Steps between loss reports."),
        steps_per_eval: int | None = flag("--steps-per-eval", help_text="Steps between validations."),
        grad_accumulation_steps: int | None = flag("--grad-accumulation-steps", help_text="Steps per update."),
        resume_adapter_file: str | None = flag(
            "--resume-adapter-file", help_text="Continue from these saved adapter weights."
        ),
        adapter_path: str | None = flag("--adapter-path", help_text="Folder to save the adapters in."),
        save_every: int | None = flag("--save-every", help_text="Save the adapters every N steps."),
        max_seq_length: int | None = flag(
            "--max-seq-length", help_text="Longest example, in positions (images included)."
        ),
        config: str | None = flag("--config", "-c", help_text="A YAML file of options (as mlx_lm.lora's)."),
        grad_checkpoint: bool | None = flag("--grad-checkpoint", help_text="Trade compute for memory."),
        seed: int | None = flag("--seed", help_text="Random seed (default 0)."),
        image_folder: str | None = flag(
            "--image-folder", help_text="Where relative image paths start (default: the data file's folder)."
        ),
        skip_bad_lines: bool | None = flag(
            "--skip-bad-lines", help_text="Report and skip bad lines instead of stopping."
        ),
        train_projector: bool | None = flag("--train-projector", help_text="Also train the projector."),
        train_vision: bool | None = flag("--train-vision", help_text="Also train the vision tower (no cache)."),
        feature_cache_size: int | None = flag(
            "--feature-cache-size", help_text="MB of image features kept in memory (default 2048; 0: none)."
        ),
        save_features: bool | None = flag(
            "--save-features", help_text="Keep the image features in the adapter folder for a later run."
        ),
        quantize: bool | None = flag("--quantize", "-q", help_text="Quantize the decoder at load (QLoRA)."),
        q_bits: int | None = flag("--q-bits", help_text="Bits of -q (default 4)."),
        q_group_size: int | None = flag("--q-group-size", help_text="Group size of -q (default 64)."),
    ):
        given = dict(locals())
        given.pop("config")
        tune(options(given, config))

    app(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
