"""The prepared one-call accelerator run (issue #24): every part in order, each in its own process
under one deadline, their results merged into one JSON as each part ends. `gpu_run.sh` calls it
(after installing the wheels the device's image lacks); tests/test_benchmarks.py runs the same
call on the CPU at a tiny size.

Parts (--parts; each one's failure or time-out is recorded and the next part runs):

  recipe      benchmarks/recipe_run.py: the config's recipe (configs/cifar_simclr.py: ResNet-18,
              batch 512, LARS, bf16) on --data-dir for --minutes of pretraining (or --epochs),
              the kNN monitor every --knn-every epochs, then the frozen linear probe and kNN on
              every train label and the test split, the same model's kNN at its initialisation,
              and fine-tune vs scratch for --downstream-epochs on every train label;
  throughput  benchmarks/throughput.py, bf16 then float32 (--throughput-precisions): the pretrain
              step's images/s and MFU against the matmul peak of a --peak-size square matmul in
              that dtype, measured in the same run;
  torch       benchmarks/vs_torch.py: the project's bf16 step and torch_reference's step on
              --torch-device (bf16 autocast, channels_last, torch.compile), interleaved; if that
              fails and time is left, once more without torch.compile (recorded as such).

Time: each part gets until the deadline (--deadline-s after --started-at) less what the parts
after it are guaranteed (--reserve-s, per part); a part past its time gets SIGTERM (the recipe's
loop then stops cleanly), then SIGKILL 15 s later. Its process group is killed (torch.compile's
workers with it). Every part prints into this process's stdout (gpu_run.sh tees it to the log).

Writes to --out: gpu_run.json (the parts' own JSONs, each part's status, exit code and wall
time, and a `headline` of the numbers the README table needs), knn_curve.png (kNN accuracy
against the epoch, from the recipe's monitor), and the recipe's pretrain.png and metrics.jsonl;
where the figures could not be drawn (no matplotlib), `--draw DIR` draws them later from DIR.
Exit code 0 when every part ran ok, 3 when some did not (each one's status is in the JSON).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # simclr_jax (plots) from this checkout, not an installed copy
PARTS = ("recipe", "throughput", "torch")
RESULT = "gpu_run.json"
CURVE_PNG = "knn_curve.png"
KILL_GRACE_S = 15  # between SIGTERM and SIGKILL


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--out", default=os.environ.get("OUT", os.path.join(HERE, "results", "gpu_run")))
    a("--scratch", default="/tmp/gpu_run", help="workdir, parts' JSONs, compilation cache")
    a("--parts", default=",".join(PARTS), help=f"comma-separated of {PARTS}")
    a("--started-at", type=float, default=0.0, help="epoch seconds the call began (0: now)")
    a("--deadline-s", type=float, default=570.0, help="every part ends by then (after start)")
    a(
        "--reserve-s",
        default="throughput_bfloat16=40,throughput_float32=40,torch=100",
        help="seconds kept for each later part (part=s,...)",
    )
    a("--python", default=sys.executable, help="the parts' interpreter")
    a("--draw", default="", metavar="DIR", help="only redraw DIR's knn_curve.png (gpu_run.json)")
    # the recipe
    a("--config", default="configs/cifar_simclr.py")
    a("--data-dir", default=".devdata/cifar10_pack", help="a pack (python -m simclr_jax.pack)")
    a("--data-name", default="folder", help="config.data.name (a pack is read as 'folder')")
    a("--minutes", type=float, default=3.0, help="pretraining budget")
    a("--epochs", type=int, default=0, help="pretraining epochs (0: as many as fit --minutes)")
    a("--knn-every", type=int, default=25, help="kNN monitor every N epochs")
    a("--downstream-epochs", type=int, default=10, help="fine-tune vs scratch epochs (0: off)")
    a("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    a("--timing-steps", type=int, default=5)
    a("--set", action="append", default=[], help="the recipe's config overrides key=value")
    # throughput
    a("--model", default="resnet18", help="throughput's model")
    a("--batch", type=int, default=512, help="global batch of throughput and torch")
    a("--devices", type=int, default=0, help="CPU only: simulated devices (0: as set)")
    a("--throughput-steps", type=int, default=10)
    a("--throughput-warmup", type=int, default=2)
    a("--throughput-parts", default="pretrain")
    a("--throughput-precisions", default="bfloat16,float32", help="one throughput run each")
    a("--peak-size", type=int, default=16384, help="side of the peak matmul (GPU: >= 8192)")
    # torch
    a("--torch-width", type=float, default=1.0, help="ResNet-18 width of the comparison")
    a("--torch-device", default="auto")
    a("--torch-autocast", default="bfloat16", choices=("none", "bfloat16"))
    a("--torch-compile", default=True, action=argparse.BooleanOptionalAction)
    a("--torch-compile-backend", default="inductor", help="aot_eager: traced only (CPU tests)")
    a("--torch-steps", type=int, default=30)
    a("--torch-block", type=int, default=10)
    a("--torch-warmup", type=int, default=3)
    a("--torch-threads", type=int, default=0, help="CPU: PyTorch's threads (0: one per core)")
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}; valid: {PARTS}")
    args.reserve = {
        k: float(v) for k, v in (kv.split("=") for kv in args.reserve_s.split(",") if kv)
    }
    args.started_at = args.started_at or time.time()
    return args


class Run:
    """The merged result, rewritten after every part, and the deadline's arithmetic."""

    def __init__(self, args):
        self.args = args
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.scratch, exist_ok=True)
        self.result = {
            "kind": "gpu_run",
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "deadline_s": args.deadline_s,
            "parts": {},
        }

    def elapsed(self) -> float:
        return time.time() - self.args.started_at

    def mark(self, text: str) -> None:
        print(f"[gpu_run +{self.elapsed():.0f}s] {text}", flush=True)

    def time_for(self, name: str, later: list[str]) -> float:
        """Seconds part `name` may run: to the deadline, less the later parts' reserves."""
        kept = sum(self.args.reserve.get(p, 0.0) for p in later)
        return self.args.deadline_s - self.elapsed() - kept

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        self.result["headline"] = headline(self.result["parts"])
        path = os.path.join(self.args.out, RESULT)
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(path + ".tmp", path)

    def part(self, name: str, cmd: list[str], limit: float, out_dir: str, env=None) -> dict:
        """Runs `cmd` for at most `limit` s; records its status, wall time and the JSON it wrote
        into `out_dir` (if any)."""
        entry = {"command": " ".join(cmd), "limit_s": round(limit, 1)}
        self.result["parts"][name] = entry
        if limit < 10:
            entry["status"] = "skipped: no time left"
            self.mark(f"{name}: skipped, {limit:.0f} s left for it")
            self.save()
            return entry
        self.mark(f"{name}: start (at most {limit:.0f} s)")
        t0 = time.time()
        entry["rc"], entry["timed_out"] = run_limited(cmd, limit, env)
        entry["wall_s"] = time.time() - t0
        if entry["timed_out"]:
            entry["status"] = f"timed out after {limit:.0f} s"
        else:
            entry["status"] = "ok" if entry["rc"] == 0 else f"failed (exit {entry['rc']})"
        found = sorted(n for n in os.listdir(out_dir) if n.endswith(".json"))
        if found:  # one each (throughput.py and vs_torch.py name theirs by the device)
            with open(os.path.join(out_dir, found[-1])) as f:
                entry["result"] = json.load(f)
        self.mark(f"{name}: {entry['status']} in {entry['wall_s']:.0f} s")
        self.save()
        return entry


def run_limited(cmd: list[str], limit: float, env=None) -> tuple[int, bool]:
    """(exit code, timed out): `cmd` in its own process group, SIGTERM at `limit` s, SIGKILL
    KILL_GRACE_S later; its output goes to ours."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return proc.returncode, True
    finally:
        try:  # anything the part left behind in its group (compile workers)
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# ----------------------------------------------------------------------------- the parts


def recipe_cmd(args, workdir: str, out: str) -> list[str]:
    cmd = [args.python, os.path.join(HERE, "recipe_run.py"), "--config", args.config]
    cmd += ["--set", f"data.name={args.data_name}", "--data-dir", args.data_dir]
    cmd += ["--minutes", str(args.minutes), "--epochs", str(args.epochs)]
    cmd += ["--knn-every", str(args.knn_every), "--downstream-epochs", str(args.downstream_epochs)]
    cmd += ["--precision", args.precision, "--timing-steps", str(args.timing_steps)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd + ["--workdir", workdir, "--out", out, "--out-name", "recipe.json"]


def throughput_cmd(args, precision: str, out: str) -> list[str]:
    cmd = [args.python, os.path.join(HERE, "throughput.py"), "--model", args.model]
    cmd += ["--batch", str(args.batch), "--precision", precision, "--parts", args.throughput_parts]
    cmd += ["--steps", str(args.throughput_steps), "--warmup", str(args.throughput_warmup)]
    cmd += ["--peak-size", str(args.peak_size), "--devices", str(args.devices)]
    return cmd + ["--tag", "gpu-run", "--out", out]


def torch_cmd(args, out: str, compile_: bool) -> list[str]:
    cmd = [args.python, os.path.join(HERE, "vs_torch.py"), "--widths", str(args.torch_width)]
    cmd += ["--batch", str(args.batch), "--precision", args.precision]
    cmd += ["--steps", str(args.torch_steps), "--block", str(args.torch_block)]
    cmd += ["--warmup", str(args.torch_warmup), "--peak-size", str(args.peak_size)]
    cmd += ["--devices", str(args.devices), "--torch-device", args.torch_device]
    cmd += ["--torch-autocast", args.torch_autocast, "--torch-threads", str(args.torch_threads)]
    if compile_:
        cmd += ["--torch-compile", "--torch-compile-backend", args.torch_compile_backend]
    return cmd + ["--tag", "gpu-run", "--out", out]


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.draw:  # here, from what a device run returned (its image may lack matplotlib)
        return redraw(args.draw)
    run = Run(args)
    env = dict(os.environ)  # one compilation cache for every part (tests bring their own)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.scratch, "xla_cache"))
    env.pop("XLA_FLAGS", None)  # the parts set their own (--devices)
    workdir = os.path.join(args.scratch, "recipe")
    for old in (workdir, os.path.join(args.scratch, "parts")):  # a previous call's (not the cache)
        shutil.rmtree(old, ignore_errors=True)
    out = {}  # each part's own output directory
    for name in ("recipe", "throughput_bfloat16", "throughput_float32", "torch", "torch_eager"):
        out[name] = os.path.join(args.scratch, "parts", name)
        os.makedirs(out[name], exist_ok=True)
    plan = []  # (name, command)
    if "recipe" in args.parts:
        plan.append(("recipe", recipe_cmd(args, workdir, out["recipe"])))
    if "throughput" in args.parts:
        for p in args.throughput_precisions.split(","):
            plan.append((f"throughput_{p}", throughput_cmd(args, p, out[f"throughput_{p}"])))
    if "torch" in args.parts:
        plan.append(("torch", torch_cmd(args, out["torch"], args.torch_compile)))
    run.mark(f"parts: {[p[0] for p in plan]}; deadline {args.deadline_s:.0f} s")
    run.save()
    for i, (name, cmd) in enumerate(plan):
        later = [p[0] for p in plan[i + 1 :]]
        entry = run.part(name, cmd, run.time_for(name, later), out[name], env)
        if name == "recipe":
            collect_recipe(args, run, workdir)
        if name == "torch" and entry.get("status") != "ok" and args.torch_compile:
            # torch.compile failed or ran out of time: the eager step, so a ratio still exists
            cmd = torch_cmd(args, out["torch_eager"], False)
            run.part("torch_eager", cmd, run.time_for("torch_eager", []), out[name + "_eager"], env)
    run.mark("done")
    run.save()
    print(json.dumps(run.result["headline"], indent=1))
    return run.result


def collect_recipe(args, run: Run, workdir: str) -> None:
    """The recipe's pictures and metrics.jsonl into --out, and the kNN-vs-epoch figure (from
    metrics.jsonl, so that a recipe killed in pretraining still gives its curve)."""
    entry = run.result["parts"]["recipe"]
    for name in ("pretrain.png", "metrics.jsonl"):
        src = os.path.join(workdir, name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(args.out, name))
    records = pretrain_records(workdir)
    curve = entry["knn_curve_points"] = curve_points(entry.get("result") or {}, records)
    try:  # the figures need matplotlib, which the device's image may lack: then drawn here
        if records and not os.path.exists(os.path.join(args.out, "pretrain.png")):
            draw_pretrain(records, os.path.join(args.out, "pretrain.png"), entry.get("status"))
        if curve["monitor"] or curve["final"]:
            draw_curve(curve, os.path.join(args.out, CURVE_PNG), entry.get("result") or {})
    except Exception as err:  # noqa: BLE001 (the figures are not worth the run)
        entry["figure_error"] = f"{type(err).__name__}: {err}"
    run.save()


def draw_pretrain(records: list[dict], path: str, status) -> None:
    """pretrain.png (loss, learning rate, kNN monitor against the step) from the records, where
    the recipe did not draw it (stopped, or no matplotlib where it ran)."""
    from simclr_jax import plots

    plots.pretrain_curves(records, path, f"SimCLR pretraining (the recipe: {status})", 0.1)


def redraw(directory: str) -> dict:
    """knn_curve.png, and pretrain.png if missing, in a returned $OUT folder (DIR)."""
    with open(os.path.join(directory, RESULT)) as f:
        result = json.load(f)
    recipe = result["parts"]["recipe"]
    draw_curve(recipe["knn_curve_points"], os.path.join(directory, CURVE_PNG), recipe["result"])
    records = pretrain_records(directory)
    if records and not os.path.exists(os.path.join(directory, "pretrain.png")):
        draw_pretrain(records, os.path.join(directory, "pretrain.png"), recipe.get("status"))
    print(f"drew the figures in {directory}")
    return result


def pretrain_records(workdir: str) -> list[dict]:
    """The pretraining records of the recipe's metrics.jsonl (none if it has none; a line torn by
    the stop of a part out of time is skipped)."""
    from simclr_jax.report import read_records  # no jax: the parent process stays light

    return [
        r
        for r in read_records(os.path.join(workdir, "metrics.jsonl"))
        if r.get("phase") == "pretrain"
    ]


def curve_points(recipe: dict, records: list[dict]) -> dict:
    """{'monitor': [[epoch, knn acc]...], 'init': acc at epoch 0, 'final': [epoch, knn, linear]}
    from the recipe's JSON, or from its pretraining records when it did not get that far."""
    monitor = recipe.get("knn_curve")
    if monitor is None:
        spe = recipe.get("steps_per_epoch")
        monitor = [
            [r["step"] // spe if spe else r["step"], r["knn_acc"]]
            for r in records
            if "knn_acc" in r
        ]
    final = None
    if recipe.get("knn_acc") is not None:
        final = [recipe["epochs"], recipe["knn_acc"], recipe.get("linear_acc")]
    return {"monitor": monitor, "init": recipe.get("knn_acc_at_init"), "final": final}


def draw_curve(curve: dict, path: str, recipe: dict) -> None:
    """kNN test accuracy against the pretraining epoch (the monitor's points, the model at
    initialisation at epoch 0, the final frozen kNN and linear probe at the last epoch)."""
    from matplotlib.ticker import PercentFormatter

    from simclr_jax import plots

    fig = plots._figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    points = ([[0, curve["init"]]] if curve["init"] is not None else []) + curve["monitor"]
    if curve["final"] and (not points or points[-1][0] != curve["final"][0]):
        points.append(curve["final"][:2])
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "o-", color="tab:purple", label="kNN (k=200, T=0.1), test")
    if curve["final"] and curve["final"][2] is not None:
        epoch, _, linear = curve["final"]
        ax.plot([epoch], [linear], "s", color="tab:blue", label="linear probe, test")
    ax.axhline(0.1, color="gray", ls=":", label="chance (10 classes)")
    ax.set_ylim(0, 1)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set(xlabel="pretraining epoch", ylabel="test accuracy")
    title = f"{recipe.get('dataset', '?')}, {recipe.get('model', '?')}, batch "
    title += f"{recipe.get('global_batch', '?')}, {recipe.get('device', '?')}"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path)


def headline(parts: dict) -> dict:
    """The numbers the README's table needs, from whichever parts have results."""
    out = {}
    recipe = (parts.get("recipe") or {}).get("result") or {}
    for key in ("device", "epochs", "pretrain_wall_s", "images_per_s", "timed_images_per_s"):
        out[key] = recipe.get(key)
    for key in ("linear_acc", "knn_acc", "knn_acc_at_init", "final_loss", "first_logged_loss"):
        out[key] = recipe.get(key)
    fts = recipe.get("fine_tune_vs_scratch") or {}
    for run in ("finetune", "scratch"):
        out[f"{run}_test_acc"] = (fts.get(run) or {}).get("test_acc")
    for precision in ("bfloat16", "float32"):
        res = (parts.get(f"throughput_{precision}") or {}).get("result") or {}
        step = next((r for r in res.get("parts", []) if r["part"] == "pretrain"), {})
        out[f"throughput_{precision}_images_per_s"] = step.get("images_per_s")
        out[f"throughput_{precision}_mfu"] = step.get("mfu")
        out[f"throughput_{precision}_peak_gflop_per_s"] = res.get("peak_gflop_per_s")
        out[f"throughput_{precision}_gflop_per_s"] = step.get("gflop_per_s")
    bf16_peak = out["throughput_bfloat16_peak_gflop_per_s"]
    if bf16_peak and out["throughput_float32_gflop_per_s"]:  # float32 against the bf16 peak too
        out["throughput_float32_mfu_of_bf16_peak"] = (
            out["throughput_float32_gflop_per_s"] / bf16_peak
        )
    for name in ("torch", "torch_eager"):
        res = (parts.get(name) or {}).get("result") or {}
        if res.get("widths"):
            row = res["widths"][0]
            out[name] = {
                "compiled": res.get("torch_compile"),
                "project_images_per_s": row["jax"]["images_per_s"],
                "torch_images_per_s": row["torch"]["images_per_s"],
                "project_mfu": row["jax"].get("mfu"),
                "torch_mfu": row["torch"].get("mfu"),
                "ratio": row["ratio"],
            }
    out["status"] = {name: p.get("status") for name, p in parts.items()}
    return out


if __name__ == "__main__":
    statuses = main()["headline"].get("status", {}).values()
    sys.exit(0 if all(s == "ok" for s in statuses) else 3)  # 3: some part failed (recorded)
