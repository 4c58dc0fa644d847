"""Correctness checks run by ``bench_meta.py`` before timing: every number it prints is
for a meta-step whose meta-gradient was compared with a reference library's."""

from __future__ import annotations

import torch
from peers import PeerUnavailable, parse_library, protonet_logits, supports
from runner import Entry, build_step
from torch import Tensor
from workloads import WORKLOADS, Workload

F64_TOL = 1e-10


# Two float32 meta-gradients of one problem, summed in different orders, land at
# different distances from the float64 one: on conv4 RelationNet (16 tasks, seeds 0-3)
# pymeta's lowered and per-task loop strategies' distances differ by factors 0.8-2.5.
# Within this factor of the reference library's own distance is float32 rounding.
ROUNDING_FACTOR = 4.0


def check_gradients(entries: list[Entry], reference: Entry | None, workload: Workload, device: str = "cpu") -> None:
    """Compare each entry's float32 meta-gradient (from its last warm-up call) with the
    reference library's, relative to the reference's largest entry; fills ``grad_check``.

    Two float32 gradients differ by both libraries' rounding, which on conv4 (sums over
    thousands of images through BatchNorm) exceeds ``workload.grad_tol``. A difference
    beyond it is measured against the reference library's float64 gradient of the same
    problem: "float32 rounding" when the entry is at most :data:`ROUNDING_FACTOR` times
    farther from it than the reference's own float32 gradient, else "DIFFERS".
    """
    if reference is None or reference.grad is None:
        for e in entries:
            if e.ok:
                e.grad_check = "no reference"
        return
    tol = workload.grad_tol
    print(f"  meta-gradients (float32) vs {reference.library}, tolerance {tol:g} relative:")
    scale = max(reference.grad.abs().max().item(), 1e-300)
    exact: tuple[Tensor, str] | str | None = None  # a float64 gradient and whose (or why there is none)
    for e in entries:
        if not e.ok or e.grad is None:
            continue
        if e is reference:
            e.grad_check = "reference"
            continue
        if e.grad.shape != reference.grad.shape:
            e.grad_check = f"shape {tuple(e.grad.shape)} != {tuple(reference.grad.shape)}"
            print(f"    {e.library:22s} {e.grad_check}")
            continue
        err = (e.grad - reference.grad).abs().max().item()
        rel, why = err / scale, ""
        verdict = "ok" if rel <= tol else "DIFFERS"
        if verdict == "DIFFERS":
            if exact is None:
                exact = _float64_gradient(workload, reference, device)
            if isinstance(exact, str):
                why = f"; no float64 gradient to judge rounding ({exact})"
            else:
                judge, judge_name = exact
                own, ref_own = ((g.double() - judge).abs().max().item() / scale for g in (e.grad, reference.grad))
                verdict = "float32 rounding" if own <= ROUNDING_FACTOR * max(tol, ref_own) else "DIFFERS"
                why = f"; from {judge_name}'s float64: {own:.1e}, {reference.library}'s float32 {ref_own:.1e}"
        e.grad_check = f"{rel:.1e} {verdict}"
        print(f"    {e.library:22s} max abs {err:.3e}, rel {rel:.3e}{why}  [{verdict}]")


def _float64_gradient(workload: Workload, reference: Entry, device: str) -> tuple[Tensor, str] | str:
    """A float64 meta-gradient of ``workload`` at the entry's size and whose it is: the
    reference library's, or where that library cannot run in float64 (easyfsl's
    MatchingNetworks mixes in float32 labels) pymeta's per-task ``loop`` strategy, which
    the test suite holds to a per-task reference of the peer's code at 1e-10 in float64.
    A string says why neither could be had."""
    reasons = []
    for library in (reference.library, "pymeta[loop]"):
        try:
            step = build_step(workload, library, dtype=torch.float64, tasks=reference.tasks, device=device)
            step.step()
            return step.gradient().double(), library
        except Exception as exc:  # a peer that does not run in float64 is reported, not fatal
            reasons.append(f"{library}: " + f"{type(exc).__name__}: {exc}".splitlines()[0][:120])
    return "; ".join(reasons)


def check_float64(workload: Workload, tasks: int, device: str = "cpu") -> list[str]:
    """Meta-gradients of learn2learn, higher, torch.func and pymeta (each concrete
    strategy) on ``workload`` with ``tasks`` tasks, in float64 against learn2learn's
    float64 (exactness), and in float32 against the same float64 reference (each
    library's float32 rounding level); lines to print."""
    libs = [lib for lib in ("learn2learn", "higher", "torch.func", "pymeta[lowered]", "pymeta[vmap]", "pymeta[loop]")
            if parse_library(lib)[0] in workload.libraries and supports(lib, workload.algorithm)]  # fmt: skip
    lines = [f"  meta-gradients with {tasks} tasks vs learn2learn's float64 "
             f"(rel = max abs / max |ref|; float64 tolerance {F64_TOL:g}):"]  # fmt: skip
    grads: dict[tuple[str, torch.dtype], Tensor] = {}
    for lib in libs:
        for dtype in (torch.float64, torch.float32):
            try:
                meta = build_step(workload, lib, dtype=dtype, tasks=tasks, device=device)
                meta.step()
                grads[(lib, dtype)] = meta.gradient().double()
            except PeerUnavailable as exc:
                lines.append(f"    {lib:15s} skipped: {exc.reason}")
                break
            except Exception as exc:
                lines.append(f"    {lib:15s} failed: {type(exc).__name__}: {exc}".splitlines()[0])
                break
    ref = grads.get(("learn2learn", torch.float64))
    if ref is None:
        return [*lines, "    (learn2learn unavailable: no reference)"]
    scale = ref.abs().max().item()
    for lib in libs:
        if (lib, torch.float64) not in grads:
            continue
        rel64 = (grads[(lib, torch.float64)] - ref).abs().max().item() / scale
        g32 = grads.get((lib, torch.float32))
        rel32 = "" if g32 is None else f", float32 rel {(g32 - ref).abs().max().item() / scale:.2e}"
        verdict = "ok" if rel64 <= F64_TOL else "DIFFERS"
        note = "  (expected: vmap + BatchNorm, functorch#534)" if lib == "torch.func" else ""
        if lib == "learn2learn":
            lines.append(f"    {lib:15s} float64 reference, max |g| = {scale:.4e}{rel32}")
        else:
            lines.append(f"    {lib:15s} float64 rel {rel64:.2e} [{verdict}]{rel32}{note}")
    return lines


def check_protonet_logits(tasks: int, device: str = "cpu") -> tuple[list[str], dict[str, float]]:
    """pymeta ``ProtoNet(metric="euclidean", batch_stats="separate")`` logits vs easyfsl's,
    with the workload's BatchNorm encoder and with BatchNorm replaced by identity.

    Each library runs in float32 and float64: the float64 difference tells whether the two
    compute the same function, each library's float32-vs-float64 difference is its own
    rounding error, and the float32 difference is "equal to float32 rounding" when it is
    within the sum of the two. Returns lines to print and the float32 max abs differences.
    """
    lines = ["  ProtoNet logits, pymeta (metric='euclidean', batch_stats='separate') vs easyfsl "
             "(max abs differences; rel = / max |logit|):"]  # fmt: skip
    diffs: dict[str, float] = {}
    same_head, same_with_bn = False, False
    f32, f64 = torch.float32, torch.float64
    workload = WORKLOADS["conv4-protonet"]
    for label, batch_norm in (("conv4 with BatchNorm", True), ("conv4, BatchNorm->Identity", False)):
        logits: dict[tuple[str, torch.dtype], Tensor] = {}
        try:
            for lib in ("pymeta", "easyfsl"):
                for dtype in (f32, f64):
                    problem = workload.problem(tasks=tasks, device=device, dtype=dtype, batch_norm=batch_norm)
                    sx, sy, qx, _ = problem.data
                    with torch.no_grad():
                        logits[(lib, dtype)] = protonet_logits(lib, problem)(sx, sy, qx).double()
        except PeerUnavailable as exc:
            lines.append(f"    {label}: skipped: {exc.reason}")
            continue

        def diff(a: tuple[str, torch.dtype], b: tuple[str, torch.dtype], logits: dict = logits) -> float:
            return (logits[a] - logits[b]).abs().max().item()

        scale = logits[("easyfsl", f64)].abs().max().item()
        d32, d64 = diff(("pymeta", f32), ("easyfsl", f32)), diff(("pymeta", f64), ("easyfsl", f64))
        own = diff(("pymeta", f32), ("pymeta", f64)), diff(("easyfsl", f32), ("easyfsl", f64))
        diffs[label] = d32
        equal = d64 <= 1e-9 * scale and d32 <= sum(own)
        same_head |= equal and not batch_norm
        same_with_bn |= equal and batch_norm
        verdict = "equal to float32 rounding" if equal else "DIFFER"
        lines.append(
            f"    {label:27s} float32 {d32:.2e} (rel {d32 / scale:.1e}), float64 {d64:.2e}; "
            f"own float32 error pymeta {own[0]:.1e}, easyfsl {own[1]:.1e}  [{verdict}]"
        )
    if same_head and "conv4 with BatchNorm" in diffs and not same_with_bn:
        lines.append(
            "    -> same distance head, different BatchNorm embeddings: easyfsl normalises a "
            "task's support and query images in separate calls, which pymeta does only with "
            "ProtoNet(batch_stats='separate') (its default 'joint' normalises them together)"
        )
    return lines, diffs
