"""The `saekit` command: parse arguments, call the library, print results. Nothing else lives here."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, Optional

import typer

from saekit.errors import InputError

RUN_STORE_NAME = "runs.sqlite"  # (saekit.store.RunStore.FILENAME, without importing the store here)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="saekit: train sparse autoencoders, measure feature recovery, choose hyperparameters.",
)


@app.callback()
def _root() -> None:
    """saekit: train sparse autoencoders, measure feature recovery, choose hyperparameters."""


def _memory_limit(text: str | None) -> int | None:
    """--max-memory as bytes (None = the sweep's default of 80% of available RAM)."""
    from saekit.train.plan import parse_bytes

    if text is None:
        return None
    try:
        return parse_bytes(text)
    except ValueError as err:
        raise InputError(f"--max-memory: {err}") from None


def _stderr(prefix: str = "") -> Any:
    """A log function: each line on stderr after `prefix`, flushed."""
    return lambda text: print(f"{prefix}{text}", file=sys.stderr, flush=True)


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=float) + "\n")
    sys.stdout.flush()


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="YAML config; omitted = all defaults (the report's toy setup)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set sae.l1=[0.03,0.1]")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder: runs.sqlite and checkpoints")] = Path("saekit-out"),
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON list (one object per SAE) on stdout")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    max_memory: Annotated[
        Optional[str], typer.Option("--max-memory", help="refuse sweeps estimated to need more, e.g. 12G (default: 80% of available RAM)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="if another saekit process is using --out, wait for it instead of refusing")] = False,
) -> None:
    """Train every SAE the config describes (one, or a grid from lists), sizes as ensembles in lockstep.

    Under torchrun the ranks share the work (train.parallel; docs/guides/distributed.md); rank 0 prints."""
    from saekit.config import load_config
    from saekit.distributed import distributed_env
    from saekit.train.run import run_config

    env = distributed_env()
    cfg = load_config(config, set_ or [])
    limit = _memory_limit(max_memory)
    on_result = None if as_json else _print_summary
    results, errors = run_config(cfg, out, progress=progress, on_result=on_result, max_memory=limit, dist_env=env, wait=wait)
    if as_json and env.is_main:
        _print_json(results)
    for e in errors if env.is_main else []:
        print(f"saekit: error: {e}", file=sys.stderr)
    if errors:
        raise typer.Exit(1)


@app.command()
def activations(
    model: Annotated[str, typer.Option("--model", help="smollm2, minilm, a local model folder, or a hub id")],
    layer: Annotated[int, typer.Option("--layer", help="block index, 0-based")],
    tokens: Annotated[int, typer.Option("--tokens", help="tokens (rows) to write, rounded up to whole windows")],
    out: Annotated[Path, typer.Option("--out", help="output folder: manifest.json and shard_*.safetensors")],
    site: Annotated[str, typer.Option("--site", help="resid, mlp_out or mlp_hidden")] = "resid",
    text: Annotated[str, typer.Option("--text", help="stdlib, stdlib-code, a text file or glob, or a comma list")] = "stdlib",
    window: Annotated[int, typer.Option("--window", help="tokens per context window")] = 128,
    batch_windows: Annotated[int, typer.Option("--batch-windows", help="windows per forward pass")] = 8,
    dtype: Annotated[str, typer.Option("--dtype", help="float16 or float32 on disk")] = "float16",
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print the manifest as one JSON document on stdout")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bar on stderr")] = True,
) -> None:
    """Extract a language model's activations at one layer and site over a text into shards (resumable)."""
    import time

    from saekit.lm.extract import extract_activations

    start = time.perf_counter()
    manifest = extract_activations(
        model, layer, site, text, tokens=tokens, out=out, window=window, batch_windows=batch_windows, dtype=dtype,
        device=device, progress=progress,
    )  # fmt: skip
    if as_json:
        _print_json(manifest)
        return
    print(
        f"{out}: {manifest['tokens']} tokens ({manifest['windows']} windows of {manifest['window']}) of {manifest['model_name']} "
        f"layer {manifest['layer']} {manifest['site']} d={manifest['d']} {manifest['dtype']}, {len(manifest['shards'])} shards, "
        f"{'complete' if manifest['complete'] else 'incomplete'}, {time.perf_counter() - start:.1f}s"
    )


@app.command()
def estimate(
    out: Annotated[Path, typer.Argument(help="a finished sweep's output folder (with runs.sqlite)")],
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
) -> None:
    """Estimate the number of true features and recommend (dict_size, l1) from a sweep, without ground truth."""
    from saekit.api import estimate as estimate_features

    result = estimate_features(out)
    if as_json:
        _print_json(result)
        return
    print(f"n_features ~ {result['n_features']} (range {result['low']}-{result['high']})")
    print(f"recommended: dict_size={result['dict_size']} {result['knob']}={result[result['knob']]:g}")
    for s in result["signals"]:
        mark = {True: "agrees", False: "disagrees", None: "no verdict"}[s["agrees"]]
        print(f"  {s['name']}: {s['value']} ({mark}) - {s['note']}")


@app.command()
def report(
    out: Annotated[Path, typer.Argument(help="a finished sweep's output folder (with runs.sqlite)")],
) -> None:
    """Write OUT/report.html: heuristics, estimate and a table of all runs, in one self-contained page."""
    from saekit.pipeline import analyse_and_report

    _, path = analyse_and_report(out)
    print(path)


@app.command()
def reproduce(
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="quick (the adaptive feature-count search; about 3 minutes on the report's data on 2 CPU cores), grid (a fixed "
            "grid of 28 SAEs over size and L1, about 10 minutes), paper (the report's full grid), synth (the grid on "
            "SynthSAEBench-shaped data: 4096 features in 256 dimensions) or lm (SmolLM2's middle residual stream; "
            "--set lm.tokens=N, lm.model, lm.layer, lm.site, lm.text change the extraction)",
        ),
    ] = "quick",
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set source.n_features=256")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder")] = Path("saekit-reproduce"),
    as_json: Annotated[bool, typer.Option("--json", help="print the estimate and the runs as one JSON document on stdout")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="refuse sweeps estimated to need more, e.g. 12G")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="if another saekit process is using --out, wait for it instead of refusing")] = False,
) -> None:
    """The report's toy experiment end to end: a sweep over size and L1, the estimate, and OUT/report.html."""
    from saekit.outlock import hold_out_dir
    from saekit.pipeline import analyse_and_report
    from saekit.presets import describe, preset_config
    from saekit.train.run import refuse_several_processes, run_config

    refuse_several_processes()  # before OUT is held, so that every rank stops with this line
    if preset in ("lm", "quick"):
        with hold_out_dir(out, wait=wait):
            run = _reproduce_lm if preset == "lm" else _reproduce_search
            run(out, set_ or [], as_json=as_json, progress=progress, max_memory=max_memory)
        return
    cfg = preset_config(preset, set_ or [])
    limit = _memory_limit(max_memory)
    with hold_out_dir(out, wait=wait):
        print(describe(preset, cfg), file=sys.stderr, flush=True)
        results, errors = run_config(cfg, out, progress=progress, max_memory=limit)
        result, path = analyse_and_report(out)
    if as_json:
        _print_json({"estimate": result, "report": str(path), "runs": results, "errors": errors})
    else:
        if result is not None:
            print(result["summary"])
        print(f"report: {path}")
    if errors:
        raise typer.Exit(1)


@app.command()
def count(
    target: Annotated[Path, typer.Argument(help="a YAML config, an activations folder, a SAELens synthetic-model folder or a tensor file")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key, e.g. --set sae.arch=topk")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder: runs.sqlite, probes/, count.json, report.html")] = Path("saekit-count"),
    budget: Annotated[Optional[str], typer.Option("--budget", help="stop before a size that would pass this much time, e.g. 15m")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the curve and its verdict as one JSON document on stdout")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    max_memory: Annotated[
        Optional[str], typer.Option("--max-memory", help="largest ensemble to train, e.g. 12G (default: 80% of available RAM)")
    ] = None,
    wait: Annotated[bool, typer.Option("--wait", help="if another saekit process is using --out, wait for it instead of refusing")] = False,
) -> None:
    """How many features the data holds: an adaptive search over dictionary size (seed pairs at doubling sizes, the
    sparsity knob calibrated by probes) that stops when the count curve saturates, and its verdict in one sentence.

    Under torchrun the ranks share each size's SAEs (docs/guides/count.md); rank 0 prints."""
    from saekit.count import count_config, count_features, parse_duration
    from saekit.distributed import distributed_env

    env = distributed_env()
    cfg = count_config(target, set_ or [])
    seconds = None if budget is None else parse_duration(budget)
    log = _stderr("saekit count: ")
    result = count_features(cfg, out, budget_seconds=seconds, progress=progress, max_memory=_memory_limit(max_memory), wait=wait, log=log)
    if as_json and env.is_main:
        _print_json(result)
    elif env.is_main:
        print(result["sentence"])
        print(f"curve: {out / 'count.json'}")
    if result["errors"]:
        raise typer.Exit(1)


@app.command()
def compare(
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a source or train key, e.g. --set source.seed=7")] = None,
    out: Annotated[Path, typer.Option("--out", help="output folder: one sweep per architecture, compare.json and compare.md")] = Path(
        "saekit-compare"
    ),
    l0: Annotated[
        Optional[int],
        typer.Option(
            "--l0",
            help="the L0 to match (k of topk/batchtopk; penalty archs pick the nearest of a grid); default: the mean active features",
        ),
    ] = None,
    archs: Annotated[Optional[str], typer.Option("--archs", help="comma-separated architectures (default: all)")] = None,
    preset: Annotated[
        str,
        typer.Option(
            "--preset",
            help="the data: toy (the report's) or synth (SynthSAEBench-shaped: 4096 features in 256 dimensions, 1024 latents)",
        ),
    ] = "toy",
    as_json: Annotated[bool, typer.Option("--json", help="print the table and every SAE trained as one JSON document")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="progress bars on stderr")] = True,
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="refuse sweeps estimated to need more, e.g. 12G")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="if another saekit process is using --out, wait for it instead of refusing")] = False,
) -> None:
    """Train every architecture on the same ground-truth data at a matched L0 and tabulate MMCS, recovery, FVU, L0, dead latents."""
    from saekit.compare import run_compare

    doc = run_compare(
        set_ or [],
        out,
        archs=[a.strip() for a in archs.split(",")] if archs else None,
        target_l0=l0,
        preset=preset,
        progress=progress,
        wait=wait,
        max_memory=_memory_limit(max_memory),
        log=_stderr(),
    )
    if as_json:
        _print_json(doc)
    else:
        print(doc["table"])


@app.command()
def dashboard(
    out: Annotated[Path, typer.Argument(help="output folder holding runs/RUN_ID (and runs.sqlite)")],
    run: Annotated[str, typer.Option("--run", help="the run id of an SAE trained on language-model activations")],
    tokens: Annotated[int, typer.Option("--tokens", min=1, help="activation rows to scan")] = 200_000,
    contexts: Annotated[int, typer.Option("--contexts", min=1, help="top-activating contexts kept per latent")] = 10,
    output: Annotated[Optional[Path], typer.Option("--output", help="HTML file to write (default OUT/dashboards/RUN_ID.html)")] = None,
) -> None:
    """Write a self-contained HTML feature dashboard for one SAE: latent index, contexts, histograms, logit weights."""
    from saekit.report.dashboard import write_dashboard

    path = write_dashboard(out, run, n_tokens=tokens, contexts=contexts, output=output)
    print(path)


@app.command("export")
def export_(
    run: Annotated[Path, typer.Argument(help="a saekit run folder, OUT/runs/RUN_ID")],
    out: Annotated[Path, typer.Argument(help="folder to write")],
    format_: Annotated[str, typer.Option("--format", help="saelens: cfg.json + sae_weights.safetensors, readable by SAE.load_from_disk")],
) -> None:
    """Write a trained SAE in another library's layout (input scale folded in: it acts on raw activations)."""
    from saekit.interop import EXPORT_FORMATS, export_saelens

    if format_ not in EXPORT_FORMATS:
        raise InputError(f"--format must be one of {', '.join(EXPORT_FORMATS)}, got {format_!r}")
    path = export_saelens(run, out)
    print(path)


@app.command("import")
def import_(
    path: Annotated[Path, typer.Argument(help="a SAELens folder, a dictionary_learning folder (ae.pt + config.json) or a saekit run")],
    out: Annotated[Path, typer.Option("--out", help="checkpoint folder to write, e.g. OUT/runs/NAME (saekit dashboard OUT --run NAME)")],
    activations: Annotated[
        Optional[Path], typer.Option("--activations", help="the activations folder (saekit activations) the SAE reads, for the dashboard")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
) -> None:
    """Read an SAE saved by SAELens or dictionary_learning and write it as a saekit checkpoint (cfg.json + sae.safetensors)."""
    from saekit.interop import import_sae

    summary = import_sae(path, out, activations=activations)
    if as_json:
        _print_json(summary)
        return
    src = summary["source"]
    kind = src.get("architecture") or src.get("dict_class") or src.get("run_id") or ""
    print(f"{out}: {summary['arch']} d={summary['d']} dict_size={summary['dict_size']} from {src['format']} {kind}".rstrip())


@app.command()
def bench(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON document on stdout")] = False,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch.set_num_threads for every measurement")] = 2,
    quick: Annotated[bool, typer.Option("--quick", help="fewer repeats (a smoke test, not a measurement)")] = False,
    device: Annotated[str, typer.Option("--device", help="cpu or cuda")] = "cpu",
) -> None:
    """Measure training throughput against this machine's matmul rate and a plain PyTorch loop."""
    from saekit.bench import run_benchmarks
    from saekit.device import resolve_device

    dev = resolve_device(device)
    results = run_benchmarks(threads=threads, quick=quick, device=str(dev))
    if as_json:
        _print_json(results)
        return
    e = results["ensemble"]
    print(
        f"roofline_fraction {results['roofline_fraction']:.2f}  ensemble_speedup {results['ensemble_speedup']:.2f}  "
        f"data_fraction_of_step {results['data_fraction_of_step']:.2f}\n"
        f"ensemble: K={e['members']} d={e['d']} m={e['dict_size']} batch={e['batch_size']}: "
        f"one batched step {e['ensemble_step_ms']:.1f} ms, "
        f"{e['members']} separate steps {e['sequential_steps_ms']:.1f} ms"
    )
    for name in ("training", "training_batch_256"):
        r = results[name]
        print(
            f"{name}: d={r['d']} m={r['dict_size']} batch={r['batch_size']} threads={r['threads']}\n"
            f"  saekit step {r['step_ms']:.2f} ms = {r['samples_per_second']:,.0f} samples/s = {r['achieved_gflops']:.0f} GFLOP/s\n"
            f"  bare matmuls of the step {r['matmul_ms']:.2f} ms ({r['matmul_gflops']:.0f} GFLOP/s): "
            f"roofline_fraction {r['roofline_fraction']:.2f}\n"
            f"  plain PyTorch loop {r['plain_step_ms']:.2f} ms: speedup_vs_plain {r['speedup_vs_plain']:.2f}\n"
            f"  toy batch {r['data_ms']:.2f} ms ({r['data_fraction_of_step']:.2f} of a step), "
            f"correlated {r['data_correlated_ms']:.2f} ms ({r['data_correlated_fraction_of_step']:.2f})"
        )
    s = results["sparse_decode"]
    print(
        f"sparse_decode: d={s['d']} m={s['dict_size']} k={s['k']} batch={s['batch_size']}: decode forward+backward "
        f"sparse {s['sparse_decode_ms']:.1f} ms, dense {s['dense_decode_ms']:.1f} ms: sparse_decode_speedup "
        f"{s['sparse_decode_speedup']:.2f}"
        + (
            f"; TopK step {s['topk_step_ms']:.0f} ms, {s['topk_dense_decode_step_ms']:.0f} ms decoding densely: "
            f"topk_step_speedup {s['topk_step_speedup']:.2f}"
            if "topk_step_ms" in s
            else ""
        )
    )
    x = results.get("extraction") or {}
    if "skipped" in x:
        print(f"extraction: skipped ({x['skipped']})")
    elif x:
        print(
            f"extraction: {x['model']} layer {x['layer']} {x['site']} threads={x['threads']}: "
            f"{x['extraction_tokens_per_s']:,.0f} tokens/s, bare forward {x['bare_tokens_per_s']:,.0f} tokens/s: "
            f"extraction_fraction {x['extraction_fraction']:.2f} "
            f"(full model {x['full_model_tokens_per_s']:,.0f} tokens/s)"
        )


def _reproduce_search(out: Path, overrides: list[str], *, as_json: bool, progress: bool, max_memory: str | None) -> None:
    """`reproduce --preset quick`: the search, its report, and the sentence (or the JSON document)."""
    from saekit.pipeline import reproduce_search

    log = _stderr("saekit reproduce: ")
    _stderr()("saekit reproduce --preset quick: the adaptive feature-count search (saekit count) on the data")
    done = reproduce_search(out, overrides, progress=progress, max_memory=_memory_limit(max_memory), log=log)
    if as_json:
        _print_json(done)
    else:
        print(done["estimate"]["summary"])
        print(f"report: {done['report']}")
    if done["errors"]:
        raise typer.Exit(1)


def _reproduce_lm(out: Path, overrides: list[str], *, as_json: bool, progress: bool, max_memory: str | None) -> None:
    """The lm preset: extraction, sweep, estimate, report and dashboard (see saekit.pipeline.reproduce_lm)."""
    from saekit.pipeline import reproduce_lm

    limit = _memory_limit(max_memory)
    result = reproduce_lm(out, overrides, progress=progress, max_memory=limit, log=_stderr())
    if as_json:
        _print_json({k: v for k, v in result.items() if k != "manifest"} | {"activations": result["manifest"].get("tokens")})
    else:
        if result["estimate"] is not None:
            print(result["estimate"]["summary"])
        print(f"report: {result['report']}")
        if result["dashboard"]:
            print(f"dashboard ({result['dashboard_run']}): {result['dashboard']}")
        print(f"took {result['seconds'] / 60:.1f} min (extraction {result['extract_seconds'] / 60:.1f} min)")
    if result["errors"]:
        raise typer.Exit(1)


def _print_summary(row: dict[str, Any]) -> None:
    parts = [f"{row['run_id']}", f"status={row['status']}"]
    for key in ("mse", "fvu", "l0", "dead_fraction", "mmcs", "recovered_0_9"):
        if row.get(key) is not None:
            parts.append(f"{key}={row[key]:.4g}")
    if row.get("seconds"):
        parts.append(f"seconds={row['seconds']:.1f}")
    print("  ".join(parts), flush=True)


def main() -> None:
    """Entry point, and the one place errors become exit codes: a command's InputError (bad config, data or
    arguments; on each rank under torchrun) is one line on stderr and exit 2, anything unexpected one line and exit 1."""
    try:
        code = app(standalone_mode=False)  # click returns the code of a typer.Exit here
        sys.exit(code if isinstance(code, int) else 0)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except InputError as err:
        _fail(str(err), 2)
    except (typer.BadParameter, typer.Abort) as err:
        _fail(str(err), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except OSError as err:  # the system refused (disk full, permissions): not bad input, so exit 1
        _fail(_os_error_line(err), 1)
    except sqlite3.Error as err:  # only the run store uses SQLite (disk full: "disk I/O error"; "database is locked")
        _fail(f"{RUN_STORE_NAME}: {err}", 1)
    except Exception as err:  # noqa: BLE001 - the CLI's last line of defence: one line, exit 1
        import click

        if isinstance(err, click.ClickException):
            _fail(err.format_message(), 2)
        _fail(f"{type(err).__name__}: {err}", 1)


def _os_error_line(err: OSError) -> str:
    """'FILE: no space left on device' (the file named when known)."""
    reason = err.strerror.lower() if err.strerror else (str(err) or "unknown system error")
    return f"{err.filename}: {reason}" if err.filename else f"{type(err).__name__}: {reason}"


def _fail(message: str, code: int) -> NoReturn:
    first_line = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"saekit: error: {first_line}", file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
