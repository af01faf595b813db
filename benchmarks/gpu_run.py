"""The prepared GPU calls (issue #34): two calls of the device tool, each a list of parts run in
order, each part in its own process under the call's deadline, their results merged into one
record of the call as each part ends. `gpu_run.sh recipe|speed` calls it (after checking and
installing the pinned wheels); benchmarks/gpu_plan.py holds the budget; docs/gpu.md says how to
prepare and make the calls; tests/test_benchmarks.py runs both calls on the CPU at a tiny size.

Call `recipe` (accuracy first; carries the pack):
  recipe               benchmarks/recipe_run.py: configs/cifar_simclr.py (ResNet-18, batch 512,
                       LARS, bf16) on --data-dir for the epochs gpu_plan's budget fits before the
                       deadline (or --epochs), compiled once (the timed steps are the run's own
                       program), the kNN monitor every --knn-every epochs, fewer epochs if
                       pretraining would end after the plan's time for it; then the frozen linear
                       probe and kNN on every train label, fine-tune vs scratch for
                       --downstream-epochs, the kNN at initialisation.
Call `speed` (no pack), by value until its deadline:
  torch                benchmarks/vs_torch.py: the project's bf16 step and torch_reference's step
                       on --torch-device (bf16 autocast, channels_last, torch.compile),
                       interleaved, both MFUs against the bf16 matmul peak of the same run
                       (--peak-size, random operands); it gets what is left less torch_eager's;
  torch_eager          only if torch failed or ran out of time: the same without torch.compile,
                       in the time kept for it;
  throughput_bfloat16  benchmarks/throughput.py: the pretrain step's images/s and MFU alone;
  throughput_float32   the same in float32.

Time: a part gets until the deadline (--deadline-s after --started-at) less what is kept for the
parts after it; one that would get less than its plan's minimum is skipped (and recorded); a part
past its time gets SIGTERM (the recipe's loop then stops cleanly), then SIGKILL 15 s later, its
whole process group with it. Every part prints into this process's stdout (gpu_run.sh tees it).

Writes to --out the call's record, <card>-<call>.json, rewritten as each part ends: the figures
as top-level keys (recipe: device, train_images, test_images, epochs, images_per_s, linear_acc,
knn_acc, knn_curve, finetune_vs_scratch; speed: device, images_per_s and mfu per precision,
torch_images_per_s, ratio), `plan` (the budget it ran under), `parts` (each part's own JSON,
status, exit code, limit and wall time); for the recipe also knn_curve.png, pretrain.png and
metrics.jsonl. `--draw DIR` draws the figures here from a returned folder (an image without
matplotlib). Exit code 0 when every part that ran was ok, 3 when some did not.
"""

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)  # simclr_jax (plots) from this checkout, not an installed copy
sys.path.insert(0, HERE)
import gpu_plan  # noqa: E402  (stdlib only)

CALLS = {"recipe": ("recipe",), "speed": ("throughput", "torch")}
# call 2's parts by value (gpu_plan.speed_rows); torch_eager runs after torch if torch fails
SPEED_ORDER = ("torch", "throughput_bfloat16", "throughput_float32")
CURVE_PNG = "knn_curve.png"
KILL_GRACE_S = 15  # between SIGTERM and SIGKILL


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("call", nargs="?", choices=tuple(CALLS), help="recipe (call 1) or speed (call 2)")
    a("--out", default=os.environ.get("OUT", os.path.join(HERE, "results", "gpu_run")))
    a("--scratch", default="/tmp/gpu_run", help="workdir, parts' JSONs, compilation cache")
    a("--parts", default="", help="comma-separated, of the call's parts (default: all of them)")
    a("--started-at", type=float, default=0.0, help="epoch seconds the call began (0: now)")
    a("--deadline-s", type=float, default=0.0, help="every part ends by then (0: the plan's)")
    a("--card", default="", help="the accelerator's name (default: nvidia-smi's, else cpu)")
    a("--python", default=sys.executable, help="the parts' interpreter")
    a("--draw", default="", metavar="DIR", help="only redraw DIR's figures (its recipe record)")
    # the recipe
    a("--config", default="configs/cifar_simclr.py")
    a("--data-dir", default=gpu_plan.PACK, help="a pack (python -m simclr_jax.data.pack)")
    a("--data-name", default="folder", help="config.data.name (a pack is read as 'folder')")
    a("--epochs", type=int, default=0, help="pretraining epochs, exactly (0: the plan's)")
    a("--knn-every", type=int, default=gpu_plan.KNN_EVERY, help="kNN monitor every N epochs")
    a("--downstream-epochs", type=int, default=gpu_plan.DOWNSTREAM_EPOCHS, help="(0: off)")
    a("--precision", default="bfloat16", choices=("float32", "bfloat16"))
    a("--timing-steps", type=int, default=5)
    a("--set", action="append", default=[], help="the recipe's config overrides key=value")
    # throughput
    a("--model", default="resnet18", help="throughput's model")
    a("--batch", type=int, default=gpu_plan.BATCH, help="global batch of throughput and torch")
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
    if not args.call and not args.draw:
        p.error(f"which call: one of {tuple(CALLS)}")
    valid = CALLS.get(args.call, ())
    args.parts = [s for s in args.parts.split(",") if s] or list(valid)
    unknown = set(args.parts) - set(valid)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)} for the {args.call} call; valid: {valid}")
    args.deadline_s = args.deadline_s or gpu_plan.DEADLINES.get(args.call, 0.0)
    args.started_at = args.started_at or time.time()
    args.card = args.card or card_name()
    return args


def card_name() -> str:
    """The first GPU's name as nvidia-smi gives it ('NVIDIA H200'), or 'cpu' without one."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "cpu"
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else "cpu"


def record_name(card: str, call: str) -> str:
    """<card>-<call>.json, the card as a file name ('nvidia-h200-recipe.json')."""
    return f"{re.sub(r'[^a-z0-9]+', '-', card.lower()).strip('-')}-{call}.json"


class Run:
    """The call's record, rewritten after every part, and the deadline's arithmetic."""

    def __init__(self, args):
        self.args = args
        os.makedirs(args.out, exist_ok=True)
        os.makedirs(args.scratch, exist_ok=True)
        self.result = {
            "kind": "gpu_run",
            "call": args.call,
            "device": args.card,
            "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
            "deadline_s": args.deadline_s,
            "plan": {},
            "parts": {},
        }

    def elapsed(self) -> float:
        return time.time() - self.args.started_at

    def left(self, kept: float = 0.0) -> float:
        """Seconds to the deadline, less `kept` for later parts."""
        return self.args.deadline_s - self.elapsed() - kept

    def mark(self, text: str) -> None:
        print(f"[gpu_run +{self.elapsed():.0f}s] {text}", flush=True)

    def save(self) -> None:
        self.result["elapsed_s"] = self.elapsed()
        self.result.update(figures(self.args.call, self.result["parts"]))
        path = os.path.join(self.args.out, record_name(self.args.card, self.args.call))
        with open(path + ".tmp", "w") as f:
            json.dump(self.result, f, indent=1)
        os.replace(path + ".tmp", path)

    def part(self, name: str, cmd, limit: float, out_dir: str, env=None, need=10.0) -> dict:
        """Runs `cmd` for at most `limit` s (skipped when that is under `need`); records its
        status, wall time and the JSON it wrote into `out_dir` (if any)."""
        entry = {"command": " ".join(cmd), "limit_s": round(limit, 1)}
        self.result["parts"][name] = entry
        if limit < need:
            entry["status"] = f"skipped: {max(limit, 0):.0f} s left, it needs {need:.0f}"
            self.mark(f"{name}: {entry['status']}")
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


def recipe_cmd(args, epochs: int, workdir: str, out: str) -> list[str]:
    cmd = [args.python, os.path.join(HERE, "recipe_run.py"), "--config", args.config]
    cmd += ["--set", f"data.name={args.data_name}", "--data-dir", args.data_dir]
    cmd += ["--epochs", str(epochs), "--knn-every", str(args.knn_every)]
    cmd += ["--downstream-epochs", str(args.downstream_epochs)]
    cmd += ["--precision", args.precision, "--timing-steps", str(args.timing_steps)]
    for item in args.set:
        cmd += ["--set", item]
    return cmd + ["--workdir", workdir, "--out", out]


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


def part_dir(args, name: str) -> str:
    path = os.path.join(args.scratch, "parts", name)
    os.makedirs(path, exist_ok=True)
    return path


def recipe_call(args, run: Run, env: dict) -> None:
    """Call 1: the recipe, for the plan's epochs (or --epochs, exactly), under the deadline."""
    m = gpu_plan.measured()
    epochs = args.epochs or gpu_plan.recipe_epochs(m, args.deadline_s)
    plan = run.result["plan"] = {"epochs": epochs, "rows": gpu_plan.recipe_rows(m, epochs)}
    workdir, out = os.path.join(args.scratch, "recipe"), part_dir(args, "recipe")
    cmd = recipe_cmd(args, epochs, workdir, out)
    if not args.epochs:  # the plan's epochs: fewer if pretraining would end after the plan's time
        plan["pretrain_ends_s"] = gpu_plan.pretrain_ends_s(m, epochs)
        cmd += ["--pretrain-by", f"{args.started_at + plan['pretrain_ends_s']:.1f}"]
        rate = m["streamed_images_per_s"] / m["timed_images_per_s"]
        cmd += ["--rate-factor", f"{rate:.4f}", "--knn-check-s", f"{gpu_plan.check_s(m):.2f}"]
    run.mark(f"recipe: {epochs} epochs planned; deadline {args.deadline_s:.0f} s")
    run.part("recipe", cmd, run.left(), out, env)
    collect_recipe(args, run, workdir)


def speed_call(args, run: Run, env: dict) -> None:
    """Call 2, by value: PyTorch beside the project's bf16 step (torch.compile; eager in the time
    kept for it if that fails), the bf16 step alone, the float32 step, each while its plan's
    minimum is left before the deadline."""
    m = gpu_plan.measured()
    budget = gpu_plan.speed_budget(m)
    run.result["plan"] = {"rows": gpu_plan.speed_rows(m)}
    wanted = set(args.parts) & {"torch"}
    if "throughput" in args.parts:
        wanted |= {f"throughput_{p}" for p in args.throughput_precisions.split(",")}
    order = [name for name in SPEED_ORDER if name in wanted]
    eager = budget["torch_eager"] if "torch" in order and args.torch_compile else 0.0
    run.mark(f"speed: {order}; deadline {args.deadline_s:.0f} s")
    for i, name in enumerate(order):
        kept = eager if "torch" in order[i:] else 0.0
        if name != "torch":
            cmd = throughput_cmd(args, name.split("_", 1)[1], part_dir(args, name))
            run.part(name, cmd, run.left(kept), part_dir(args, name), env, budget[name])
            continue
        # torch gets whatever is left: torch.compile's first compile is the unknown
        need = gpu_plan.torch_minimum_s(m)
        cmd = torch_cmd(args, part_dir(args, name), args.torch_compile)
        entry = run.part(name, cmd, run.left(kept), part_dir(args, name), env, need)
        if entry["status"] != "ok" and args.torch_compile:  # a ratio still comes back
            eager_dir = part_dir(args, "torch_eager")
            cmd = torch_cmd(args, eager_dir, False)
            run.part("torch_eager", cmd, run.left(), eager_dir, env, budget["torch_eager"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.draw:  # here, from what a device run returned (its image may lack matplotlib)
        return redraw(args.draw)
    run = Run(args)
    env = dict(os.environ)  # one compilation cache for every part (tests bring their own)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(args.scratch, "xla_cache"))
    env.pop("XLA_FLAGS", None)  # the parts set their own (--devices)
    for old in ("recipe", "parts"):  # a previous call's (not the cache)
        shutil.rmtree(os.path.join(args.scratch, old), ignore_errors=True)
    run.save()
    (recipe_call if args.call == "recipe" else speed_call)(args, run, env)
    run.mark("done")
    run.save()
    print(json.dumps({k: v for k, v in run.result.items() if k not in ("parts", "plan")}, indent=1))
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
    from simclr_jax.report import plots

    plots.pretrain_curves(records, path, f"SimCLR pretraining (the recipe: {status})", 0.1)


def redraw(directory: str) -> dict:
    """knn_curve.png, and pretrain.png if missing, in a returned $OUT folder (DIR)."""
    (path,) = glob.glob(os.path.join(directory, "*-recipe.json"))
    with open(path) as f:
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
    from simclr_jax.runtime.files import read_records  # no jax: the parent process stays light

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


def curve_list(curve: dict) -> list[list]:
    """[[epoch, kNN accuracy], ...] of `curve_points`: at initialisation (epoch 0), the monitor's
    points, and the final frozen kNN where the monitor did not check the last epoch."""
    points = ([[0, curve["init"]]] if curve["init"] is not None else []) + curve["monitor"]
    if curve["final"] and (not points or points[-1][0] != curve["final"][0]):
        points.append(curve["final"][:2])
    return points


def draw_curve(curve: dict, path: str, recipe: dict) -> None:
    """kNN test accuracy against the pretraining epoch (the monitor's points, the model at
    initialisation at epoch 0, the final frozen kNN and linear probe at the last epoch)."""
    from matplotlib.ticker import PercentFormatter

    from simclr_jax.report import plots

    fig = plots._figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    points = curve_list(curve)
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


def figures(call: str, parts: dict) -> dict:
    """The call's figures, the record's top-level keys, from whichever parts have results."""
    out = recipe_figures(parts.get("recipe") or {}) if call == "recipe" else speed_figures(parts)
    out["status"] = {name: p.get("status") for name, p in parts.items()}
    return out


def recipe_figures(entry: dict) -> dict:
    recipe = entry.get("result") or {}
    out = {k: recipe.get(k) for k in ("train_images", "test_images", "epochs", "images_per_s")}
    for key in ("linear_acc", "knn_acc", "knn_acc_at_init", "timed_images_per_s"):
        out[key] = recipe.get(key)
    out["knn_curve"] = curve_list(entry.get("knn_curve_points") or curve_points(recipe, []))
    out["finetune_vs_scratch"] = recipe.get("fine_tune_vs_scratch")
    for key in ("planned_epochs", "epochs_cut", "pretrain_wall_s", "part_wall_s"):
        out[key] = recipe.get(key)
    for key in ("first_compile_s", "data_load_s", "first_logged_loss", "final_loss"):
        out[key] = recipe.get(key)
    return out


def speed_figures(parts: dict) -> dict:
    """images/s, MFU and peak per precision (throughput), float32's MFU against the bf16 peak
    too, and PyTorch's side: the compiled comparison where it came back, else the eager one."""
    out = {"images_per_s": {}, "mfu": {}, "peak_gflop_per_s": {}}
    gflop_per_s = {}
    for precision in ("bfloat16", "float32"):
        res = (parts.get(f"throughput_{precision}") or {}).get("result") or {}
        step = next((r for r in res.get("parts", []) if r["part"] == "pretrain"), None)
        if step:
            out["images_per_s"][precision] = step["images_per_s"]
            out["mfu"][precision] = step["mfu"]
            out["peak_gflop_per_s"][precision] = res["peak_gflop_per_s"]
            gflop_per_s[precision] = step["gflop_per_s"]
    if "float32" in gflop_per_s and "bfloat16" in out["peak_gflop_per_s"]:
        out["mfu"]["float32_of_bfloat16_peak"] = (
            gflop_per_s["float32"] / out["peak_gflop_per_s"]["bfloat16"]
        )
    for key in ("torch_images_per_s", "project_images_per_s", "ratio", "torch_compiled"):
        out[key] = None
    for name in ("torch", "torch_eager"):
        res = (parts.get(name) or {}).get("result") or {}
        if res.get("widths"):
            row = res["widths"][0]
            out.update(
                torch_images_per_s=row["torch"]["images_per_s"],
                project_images_per_s=row["jax"]["images_per_s"],
                ratio=row["ratio"],
                torch_compiled=res["torch_compile"],
                torch_mfu=row["torch"].get("mfu"),
                project_mfu=row["jax"].get("mfu"),
            )
            break
    return out


if __name__ == "__main__":
    statuses = main().get("status", {}).values()
    sys.exit(0 if all(s == "ok" or s.startswith("skipped") for s in statuses) else 3)
