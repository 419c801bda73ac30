"""The ``metalab`` command: train, evaluate, adapt, compare, serve, datasets."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from metalab import __version__

if TYPE_CHECKING:
    from metalab.config import Config
    from metalab.evaluate import EvalResult
    from metalab.rl.run import RLConfig

EPILOG_CONFIGS = ("A config file sets keys of the run (algorithm, dataset, n_way, lr, ...); "
                  "'base: NAME' starts from another config (a built-in name or a path "
                  "relative to the file) and overrides it, option mappings key by key. "
                  "Values are checked for type and range before anything trains. "
                  "Built-in configs (use the name or a path to your own YAML): {}")


def _train(args: argparse.Namespace) -> None:
    """Train, then score best.pt on the test split. Under torchrun (several processes), the
    processes form a group for the training (see metalab.distributed); rank 0 alone prints,
    writes and scores the test split."""
    from metalab import distributed
    from metalab.config import Config, load_config
    from metalab.distributed import resolve_device

    overrides = list(args.set) + ([f"out={args.out}"] if args.out else [])
    config = load_config(args.config, overrides)
    if not isinstance(config, Config):  # kind: rl
        with distributed.process_group(torch.device("cpu")):
            _train_rl(args, config)
        return
    with distributed.process_group(resolve_device(config.device)):
        _train_in_group(args, config)


def _train_rl(args: argparse.Namespace, config: RLConfig) -> None:
    from metalab.rl.run import format_returns, train_run

    record = train_run(config, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.quiet)
    if record is not None:  # rank 0
        print(f"trained {record['iterations']} iterations in {record['train_minutes']:.1f} "
              f"min ({record['env_steps']:,.0f} environment steps)")
        for group, returns in record["by_group"].items():
            print(f"test ({group} on {config.env}'s fixed test goals, {record['checkpoint']} "
                  f"of iteration {record['weights_of_iteration']}): {format_returns(returns)}")


def _train_in_group(args: argparse.Namespace, config: Config) -> None:
    from metalab import distributed
    from metalab.runs import score_checkpoint
    from metalab.train import Trainer

    trainer = Trainer.from_config(config, progress=not args.quiet, overwrite=args.overwrite)
    main_rank = distributed.rank() == 0
    # After a lost worker, torchrun (--max-restarts) starts every worker again: they continue
    # from the job's last checkpoint, or start afresh if it had written none.
    if args.resume:
        trainer.resume()
        resumed = True
    else:
        resumed = distributed.restarted() and trainer.resume_restarted()
    if resumed and main_rank:
        print(f"resumed {config.out}/last.pt at step {trainer.state.step}", flush=True)
    state = trainer.fit()
    if not main_rank:
        return
    chosen = ("no validation split: best.pt holds the final weights" if state.best is None
              else f"best validation {trainer.kind.metric} {state.best:.2f}{trainer.kind.unit}")
    print(f"trained {state.step} steps in {state.train_seconds:.0f} s; {chosen}")
    algo, config, result = score_checkpoint(Path(config.out) / "best.pt",
                                            progress=not args.quiet)
    _write_json(Path(config.out) / "test.json", _result_record(config, result))
    print(f"test ({algo.kind.describe(config.test_n_way, config.test_k_shot)}, best.pt): "
          f"{result}")


def _result_record(config: Config, result: EvalResult) -> dict:
    return {"algorithm": config.algorithm, "dataset": config.dataset, "split": config.test_split,
            "n_way": config.test_n_way, "k_shot": config.test_k_shot,
            "q_query": config.test_q_query, **result.to_dict()}


def _write_json(path: Path, record: dict) -> None:
    from metalab.io import atomic_write_text

    atomic_write_text(json.dumps(record, indent=2) + "\n", path)


def _evaluate(args: argparse.Namespace) -> None:
    from metalab.rl.run import is_rl_checkpoint
    from metalab.runs import score_checkpoint

    if is_rl_checkpoint(args.checkpoint):
        _evaluate_rl(args)
        return
    overrides = {key: value for key, value in (
        ("test_n_way", args.n_way), ("test_k_shot", args.k_shot),
        ("test_q_query", args.q_query), ("test_split", args.split),
        ("data_dir", args.data_dir), ("device", args.device)) if value is not None}
    if args.inner_steps is not None:
        overrides["algorithm_options"] = {"test_inner_steps": args.inner_steps}
    algo, config, result = score_checkpoint(args.checkpoint, overrides, args.episodes,
                                            args.seed, progress=not args.quiet,
                                            transductive=args.transductive_bn)
    batch_norm = ", BatchNorm on batch statistics" if args.transductive_bn else ""
    print(f"{config.algorithm} on {config.dataset}/{config.test_split}, "
          f"{algo.kind.describe(config.test_n_way, config.test_k_shot)}{batch_norm}: {result}")
    if args.json:
        record = _result_record(config, result)
        record["batch_norm"] = "transductive" if args.transductive_bn else "as trained"
        _write_json(Path(args.json), record)


def _evaluate_rl(args: argparse.Namespace) -> None:
    from metalab.rl.run import evaluate_run, format_returns

    record = evaluate_run(Path(args.checkpoint), eval_steps=args.inner_steps)
    for group, returns in record["by_group"].items():
        print(f"{group}: {format_returns(returns)}")
    if args.json:
        _write_json(Path(args.json), record)


def _adapt(args: argparse.Namespace) -> None:
    from metalab.data import DATASETS, image_format
    from metalab.data.images import read_image
    from metalab.runs import load_checkpoint

    if args.finetune_top:
        if args.checkpoint is not None:
            raise ValueError("give a checkpoint or --finetune-top, not both: --finetune-top "
                             "fine-tunes the sentence encoder's top on the support itself, "
                             "from no checkpoint.")
        from metalab.studies.intents import TOP_LAYERS, finetuned_top_learner
        from metalab.text import DEFAULT_ENCODER

        layers = TOP_LAYERS if args.finetune_layers is None else args.finetune_layers
        _adapt_sentences(args, finetuned_top_learner(layers=layers), DEFAULT_ENCODER)
        return
    if args.finetune_layers is not None:
        raise ValueError("--finetune-layers says how many layers --finetune-top fine-tunes; "
                         "give it with --finetune-top (a checkpoint adapts as it was trained).")
    if args.checkpoint is None:
        raise ValueError("give the checkpoint to adapt (a run's best.pt, from metalab train), "
                         "or --finetune-top to fine-tune the sentence encoder's top on "
                         "sentences with no checkpoint.")
    algo, config = load_checkpoint(args.checkpoint)
    if getattr(DATASETS.get(config.dataset), "TEXT", False):
        from metalab.text import DEFAULT_ENCODER

        _adapt_sentences(args, algo, config.dataset_options.get("encoder", DEFAULT_ENCODER))
        return
    if args.threshold is not None:
        raise ValueError("--threshold applies to sentence classifiers (checkpoints trained on "
                         "text); an image classifier labels every image.")
    if not algo.kind.classes or len(algo.spec.input_shape) != 3:
        raise ValueError(f"metalab adapt labels images with an image classifier; "
                         f"{args.checkpoint} was trained on {algo.kind.name} tasks with inputs "
                         f"of shape {tuple(algo.spec.input_shape)}. Use it from Python, or "
                         f"train a classifier on images.")
    channels, size = algo.spec.input_shape[0], algo.spec.input_shape[-1]
    fmt = image_format(config.dataset)
    classes, support_x, support_y = _read_support(Path(args.support), channels, size, fmt)
    algo.check_ways(len(classes))
    queries = _image_files(Path(args.query))
    if not queries:
        raise ValueError(f"no images in {args.query}; put the images to label there.")
    query_x = torch.stack([read_image(p, channels, size, **fmt) for p in queries]).float() / 255
    with torch.no_grad():
        predictor = algo.adapt(support_x, support_y)
        labels = predictor(query_x).argmax(-1)
    for path, label in zip(queries, labels.tolist(), strict=True):
        print(f"{path.name}\t{classes[label]}")


def _adapt_sentences(args: argparse.Namespace, algo, encoder: str) -> None:
    """``metalab adapt`` for sentences: ``algo`` (a checkpoint trained on sentences, or the
    fine-tuned encoder top) adapted to the support's sentences by ``encoder``."""
    from metalab.text import SentenceClassifier, read_labelled_sentences

    sentences, intents = read_labelled_sentences(args.support)
    classifier = SentenceClassifier(algo, encoder, args.threshold).fit(sentences, intents)
    if args.query == "-":
        queries = sys.stdin.read().splitlines()
    elif Path(args.query).is_file():
        queries = Path(args.query).read_text(encoding="utf-8").splitlines()
    else:
        raise FileNotFoundError(f"no file {args.query}; give a text file with one sentence per "
                                "line, or - to read them from standard input.")
    queries = [q for q in queries if q.strip()]
    for query, (intent, score) in zip(queries, classifier.predict(queries), strict=True):
        print(f"{query}\t{intent or 'out-of-scope'}\t{score:.3f}")


def _image_files(folder: Path) -> list[Path]:
    from metalab.data.images import image_files

    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder.")
    return image_files(folder)


def _read_support(folder: Path, channels: int, size: int, fmt: dict):
    from metalab.data.images import read_image

    if not folder.is_dir():
        raise FileNotFoundError(f"support folder {folder} does not exist; it must hold one "
                                "sub-folder of example images per class.")
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise ValueError(f"{folder} must hold at least two class sub-folders of images, "
                         f"found {len(classes)}.")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(folder / name)
        if not files:
            raise ValueError(f"class folder {folder / name} holds no images.")
        images += [read_image(p, channels, size, **fmt) for p in files]
        labels += [label] * len(files)
    return classes, torch.stack(images).float() / 255, torch.tensor(labels)


def _serve(args: argparse.Namespace) -> None:
    import importlib.util
    import ipaddress

    missing = [m for m in ("fastapi", "uvicorn", "multipart") if not importlib.util.find_spec(m)]
    if missing:
        raise ValueError(f"metalab serve needs the serve extra (missing: {', '.join(missing)}): "
                         'pip install "metalab[serve]".')
    import uvicorn

    from metalab.serve.app import create_app
    from metalab.serve.service import Service

    token = args.token or os.environ.get("METALAB_SERVE_TOKEN") or None
    try:
        local = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        local = False
    if token is None and not local:
        raise ValueError(f"--host {args.host} lets other machines change the store; give a token "
                         "(--token or METALAB_SERVE_TOKEN) that writes must send, or bind to "
                         "127.0.0.1.")
    service = Service(args.checkpoint, args.store, readapt=args.readapt)
    app = create_app(service, token=token, batching=not args.no_batching,
                     max_batch=args.max_batch, max_upload_bytes=int(args.max_upload_mb * 2**20))
    print(f"metalab serve: {service.algorithm.name} from {args.checkpoint} reading "
          f"{service.inputs.plural}, "
          f"{len(service.task_names())} task(s) in {args.store}; "
          f"http://{args.host}:{args.port}/ (API docs at /docs); writes "
          f"{'need the token' if token else 'need no token (local only)'}", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


def _datasets(args: argparse.Namespace) -> None:
    from metalab import data

    if args.download:
        module = data.DATASETS.get(args.download)
        if not hasattr(module, "download"):
            downloadable = [n for n, m in data.DATASETS.items() if hasattr(m, "download")]
            raise ValueError(f"{args.download} cannot be downloaded by metalab; these can: "
                             f"{', '.join(downloadable)}. The others are embedded, procedural, "
                             "your own folders, or under terms that forbid redistribution.")
        folder = module.download(data.data_dirs(args.data_dir)[-1] / args.download)
        print(f"{args.download} downloaded to {folder}")
    print("searched, in order: " + ", ".join(str(p) for p in data.data_dirs(args.data_dir)))
    for name, module in data.DATASETS.items():
        print(f"  {name:<10} {module.status(args.data_dir)}")


def _compare(args: argparse.Namespace) -> None:
    from metalab.compare import parse_budget, run_compare

    def numbers(text: str, kind: type, what: str) -> list:
        try:
            return [kind(v) for v in text.split(",")]
        except ValueError:
            raise ValueError(f"{what} expects comma-separated numbers, got {text!r}.") from None

    run_compare(
        args.suite, algorithms=args.algorithms.split(",") if args.algorithms else None,
        steps=args.steps, budget=parse_budget(args.budget) if args.budget else None,
        out=Path(args.out), fresh=args.fresh, progress=not args.quiet,
        shots=None if args.shots == "none" else numbers(args.shots, int, "--shots"),
        shot_episodes=args.shot_episodes,
        diversity=numbers(args.diversity, float, "--diversity") if args.diversity else None,
        jobs=args.jobs)


def build_parser() -> argparse.ArgumentParser:
    from metalab.config import builtin_configs

    parser = argparse.ArgumentParser(
        prog="metalab", description="Meta-learning: train, evaluate and compare few-shot "
        "learners of the metric, optimization and model-based families.")
    parser.add_argument("--version", action="version", version=f"metalab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser(
        "train", help="meta-train an algorithm from a config, then score it on the test split",
        epilog=EPILOG_CONFIGS.format(", ".join(builtin_configs())))
    train.add_argument("config", help="YAML config path or built-in config name")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key (repeatable), e.g. --set steps=500 "
                       "--set algorithm_options.metric=cosine")
    train.add_argument("--out", help="output folder (default: the config's 'out')")
    existing = train.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue from <out>/last.pt exactly where it stopped; with "
                          "--set, a changed lr, weight_decay or schedule is applied and "
                          "recorded in <out>/history.jsonl (under torchrun --max-restarts, "
                          "restarted workers resume by themselves)")
    existing.add_argument("--overwrite", action="store_true",
                          help="start afresh in an output folder that holds another run, "
                          "moving that run aside to <out>.replaced-<time> (nothing is "
                          "deleted)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    train.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="accuracy (or MSE) ± 95%% CI on fixed test episodes")
    ev.add_argument("checkpoint", help="a best.pt or last.pt written by 'metalab train' (a "
                    "meta-RL run's last.pt: returns ± 95%% CI on 40 fixed test goals)")
    ev.add_argument("--episodes", type=int, default=600, help="number of test episodes (600)")
    ev.add_argument("--seed", type=int, default=1, help="seed of the fixed episodes (1)")
    ev.add_argument("--n-way", type=int, help="classes per test episode (default: config's)")
    ev.add_argument("--k-shot", type=int, help="support examples per class")
    ev.add_argument("--q-query", type=int, help="query examples per class")
    ev.add_argument("--split", help="split to test on (default: config's test_split)")
    ev.add_argument("--data-dir", help="folder holding the data sets (or set METALAB_DATA)")
    ev.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: config's)")
    ev.add_argument("--inner-steps", type=int,
                    help="gradient steps when adapting (optimization family; default: the "
                    "config's test_inner_steps; a meta-RL run: returns after 0..N steps, "
                    "default its eval_steps)")
    ev.add_argument("--transductive-bn", action="store_true",
                    help="BatchNorm normalises each batch with its own statistics (the support "
                    "set, then a task's queries together: the MAML convention, transductive) "
                    "instead of the running statistics of training")
    ev.add_argument("--json", help="also write the result to this JSON file")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(func=_evaluate)

    adapt = sub.add_parser(
        "adapt", help="adapt to your own few labelled images or sentences, label others",
        description="Adapt a trained checkpoint to a handful of labelled examples per class "
        "and label new ones, without training. Images: --support is a folder with one "
        "sub-folder of images per class, --query a folder of images. Sentences (a checkpoint "
        "trained on banking77 or clinc150): --support is a CSV with the header text,intent or "
        "a JSONL file of {\"text\": ..., \"intent\": ...}, --query a text file with one "
        "sentence per line or - for standard input; each line prints the sentence, the "
        "intent and its score, or out-of-scope when the score is below --threshold. "
        "--finetune-top, instead of a checkpoint: fine-tune the sentence encoder's last two "
        "layers and a cosine head on the support sentences themselves (nothing meta-trained; "
        "the most accurate classifier of BANKING77's 77 intents from 10 examples each here, "
        "84.7% against 80.8% for a logistic regression on frozen embeddings; under a minute "
        "of fine-tuning for 770 sentences on a 2-core CPU). --finetune-layers 6 fine-tunes "
        "the whole encoder instead: about 3 times the time, 0.5 to 0.8 points more accurate "
        "on BANKING77 validation draws.",
        epilog="Examples: metalab adapt runs/banking77/default-5w1s/best.pt --support "
        "intents.csv --query - --threshold 0.5;  metalab adapt --finetune-top --support "
        "intents.csv --query questions.txt")
    adapt.add_argument("checkpoint", nargs="?",
                       help="a run's best.pt (not with --finetune-top)")
    adapt.add_argument("--finetune-top", action="store_true",
                       help="sentences: fine-tune the encoder's top on the support instead "
                       "of adapting a checkpoint")
    adapt.add_argument("--finetune-layers", type=int, metavar="N",
                       help="with --finetune-top: how many of the encoder's last layers to "
                       "fine-tune (default 2; 6 is all of MiniLM's)")
    adapt.add_argument("--support", required=True,
                       help="folder of class sub-folders of images, or a CSV/JSONL of "
                       "sentences and intents")
    adapt.add_argument("--query", required=True,
                       help="folder of images, or a file of sentences (- for stdin)")
    adapt.add_argument("--threshold", type=float, help="sentences: answer out-of-scope when "
                       "the score (largest softmax probability) is below this (default: never)")
    adapt.set_defaults(func=_adapt)

    serve = sub.add_parser(
        "serve", help="serve a trained classifier over HTTP: register classes from a few "
        "examples, predict, with a web page",
        description="Serve a checkpoint trained on images or sentences. Clients create tasks, "
        "add classes from a handful of examples (JSON sentences or image uploads) and predict; "
        "the model adapts when a class changes, and each task's adapted state is kept in the "
        "SQLite --store with its examples, so a restart serves at once. The web page is at /, "
        "the API docs at /docs. Writes need the token when one is set; without a token the "
        "server binds only to the local machine.",
        epilog="Example: metalab serve runs/banking77/default-5w5s/best.pt --store intents.sqlite"
        " ; then curl -X POST localhost:8000/tasks -H 'Content-Type: application/json' -d "
        "'{\"name\": \"bot\"}'")
    serve.add_argument("checkpoint", help="a best.pt or last.pt written by 'metalab train'")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (8000)")
    serve.add_argument("--store", default="metalab-store.sqlite",
                       help="SQLite file of tasks, examples and adapted states, created if "
                       "absent (metalab-store.sqlite)")
    serve.add_argument("--token", help="token that writes must send as 'Authorization: Bearer "
                       "<token>' (or set METALAB_SERVE_TOKEN); required unless bound to "
                       "127.0.0.1")
    serve.add_argument("--readapt", action="store_true",
                       help="the store's tasks were adapted by another checkpoint: adapt every "
                       "task again from its stored examples")
    serve.add_argument("--no-batching", action="store_true",
                       help="compute each prediction request alone instead of micro-batching "
                       "the requests that wait")
    serve.add_argument("--max-batch", type=int, default=64,
                       help="most queries in one micro-batch (64)")
    serve.add_argument("--max-upload-mb", type=float, default=20,
                       help="largest request body in MiB (20)")
    serve.add_argument("--log-level", default="warning", help="uvicorn's log level (warning)")
    serve.set_defaults(func=_serve)

    ds = sub.add_parser("datasets", help="which data sets are available and where")
    ds.add_argument("--data-dir", help="extra folder to search first (or set METALAB_DATA)")
    ds.add_argument("--download", metavar="NAME",
                    help="download a data set: omniglot, banking77 or clinc150")
    ds.set_defaults(func=_datasets)

    cmp = sub.add_parser(
        "compare", help="train every algorithm on the same tasks; table, studies and plots",
        description="Meta-train every selected algorithm on the same task distributions, "
        "score each on the same fixed test episodes, and write one row per algorithm: score "
        "± 95%% CI, training time and steps, adaptation and query latency, parameters, peak "
        "memory while training and adapting, gradient steps to adapt. Also writes the shots "
        "study, the optional task-diversity study, and plots (PNG + SVG).",
        epilog="suites: quick (embedded glyphs + sinusoid, no download, minutes), "
        "omniglot-5w1s, omniglot-20w1s (need Omniglot: metalab datasets), sinusoid; "
        "banking77-5w1s, banking77-5w5s, banking77-77w, clinc150-oos (intents on frozen "
        "sentence embeddings, with baselines; need pip install \"metalab[text]\"), and "
        "their -top2 variants (the encoder's last two layers trained: meta-trained on the "
        "5-way suites, fine-tuned on each support set on the others) and "
        "banking77-5w1s-top2-trainval (meta-trained on the training and validation intents); "
        "or a "
        "YAML config file. Example: metalab compare --suite omniglot-5w1s --budget 5m "
        "--algorithms protonet,maml,snail")
    cmp.add_argument("--suite", default="quick", help="suite name or YAML config (quick)")
    cmp.add_argument("--algorithms", help="comma-separated names (default: every registered "
                     "algorithm that handles the suite's tasks)")
    limit = cmp.add_mutually_exclusive_group()
    limit.add_argument("--steps", type=int, help="meta-training steps for every algorithm "
                       "(default: each config's own)")
    limit.add_argument("--budget", help="meta-training time per algorithm instead of steps, "
                       "e.g. 90s, 10m, 1h (results then depend on the machine's speed)")
    cmp.add_argument("--shots", default="1,2,5,10", help="support sizes of the shots study, "
                     "comma-separated, or 'none' (1,2,5,10)")
    cmp.add_argument("--shot-episodes", type=int, default=100,
                     help="test episodes per point of the shots study (100)")
    cmp.add_argument("--diversity", nargs="?", const="0.1,0.25,0.5,1", metavar="FRACTIONS",
                     help="also meta-train on these fractions of the meta-train alphabets "
                     "(default when given alone: 0.1,0.25,0.5,1); retrains every algorithm")
    cmp.add_argument("--out", default="runs/compare", help="output folder (runs/compare)")
    cmp.add_argument("--fresh", action="store_true", help="retrain even if cached")
    cmp.add_argument("--jobs", type=int, default=1, help="trainings run at once, each in its "
                     "own process with an equal share of the CPU threads (1); on a CPU, e.g. "
                     "one per core: small models train faster side by side")
    cmp.add_argument("--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from metalab.train import TrainingDiverged

    try:
        args.func(args)
    except TrainingDiverged as error:
        print(f"metalab: {error}", file=sys.stderr)
        return 3
    except (ValueError, FileNotFoundError) as error:
        if os.environ.get("METALAB_DEBUG"):
            raise
        print(f"metalab: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
