"""Static measures read off SASS (the text `cuobjdump --dump-sass` or `nvdisasm` prints): no GPU needed.

Shared by benchmarks/cuda_resources.py and benchmarks/triton_resources.py. The API is small and
meant to stay stable:

    split_functions(dump) -> {function name: its SASS text}       (a whole cuobjdump dump)
    parse_sass(text)      -> [Instruction]                          (one function, address order)
    classify(opcode)      -> "tensor_core" | "load_store" | "other"
    basic_blocks(instrs)  -> [[Instruction]]                        (leaders: entry, branch targets,
                                                                     the instruction after a branch)
    find_loops(instrs)    -> [Loop]                                 (one per backward-branch header,
                                                                     outermost first)
    loop_counts(loop, trips=None) -> {kind: instructions per iteration of `loop`}
    per_score(count, *, threads, scores, iterations=1) -> instructions per score element

How the issue's `epilogue_instructions_per_score` is computed with these:
  take the tile loop (the loop whose one iteration produces a tile of scores, or the K loop when the
  epilogue sits after it), count its "other" instructions per iteration with `loop_counts` (inner
  loops weighted by their trip counts), then
      per_score(other, threads=threads per block, scores=scores per tile, iterations=iterations per tile)
  = other x iterations x threads / scores. Every thread issues each SASS instruction once (a warp
  issues it once for 32 lanes), so this is thread-instructions per score element. For scale: an H100
  SM issues 4 x 32 thread-instructions per clock and its tensor cores do 4096 bf16 FLOP per clock,
  so at D = 512 (1024 FLOP per score) the budget at MMA parity is about 32.

Classes: tensor_core = HMMA/HGMMA/IMMA/IGMMA/QGMMA/BGMMA/DMMA/WARPGROUP.* (and Blackwell UTC*MMA);
load_store = every LD*/ST* (LDG, LDS, LDSM, LDC, LDL, LDGSTS, STG, STS, STL, ...), the uniform ULDC,
atomics/reductions, TMA and bulk copies (UTMALDG, UTMASTG, UBLKCP, ...), surface/texture;
other = everything else (ALU, compares, selects, SHFL, BAR, branches, SYNCS, ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TENSOR_CORE = "tensor_core"
LOAD_STORE = "load_store"
OTHER = "other"
KINDS = (TENSOR_CORE, LOAD_STORE, OTHER)

_TC_PREFIXES = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BGMMA", "OMMA", "DMMA", "WARPGROUP",
                "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA", "UTCBAR")
_LS_PREFIXES = ("LD", "ST", "ULDC", "ATOM", "RED", "UTMA", "UBLK", "SULD", "SUST", "SUATOM", "SURED",
                "TLD", "TEX", "TLD4", "TXQ", "CCTL")
_BRANCHES = ("BRA", "JMP", "BRX", "JMX")
_ENDS_BLOCK = _BRANCHES + ("EXIT", "RET", "CALL", "BPT", "KILL")

_INSTR = re.compile(r"/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L[\w.]*):")
_TARGET_LABEL = re.compile(r"`?\((\.L[\w.]*)\)")
_TARGET_HEX = re.compile(r"0x([0-9a-fA-F]+)\s*$")


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # with modifiers, e.g. "HGMMA.64x192x16.F32.BF16"
    operands: str = ""
    predicate: str = ""  # e.g. "@!P0", "" when unconditional
    target: int | None = None  # branch target address, for BRA/JMP with a known target

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def kind(self) -> str:
        return classify(self.opcode)


def classify(opcode: str) -> str:
    """tensor_core / load_store / other for one SASS opcode (modifiers allowed: 'LDG.E.128')."""
    base = opcode.split(".")[0].upper()
    if base.startswith(_TC_PREFIXES):
        return TENSOR_CORE
    if base.startswith(_LS_PREFIXES):
        return LOAD_STORE
    return OTHER


def split_functions(dump: str) -> dict[str, str]:
    """The SASS text of each function in a `cuobjdump --dump-sass` (or nvdisasm) dump."""
    parts = re.split(r"\n[ \t]*(?:Function :|\.text\.)\s*(\S+?):?[ \t]*\n", "\n" + dump)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def parse_sass(text: str) -> list[Instruction]:
    """Instructions of one function in address order; branch targets resolved (hex or .L labels)."""
    raw, labels, pending = [], {}, []
    for line in text.splitlines():
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
        m = _INSTR.search(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        for name in pending:
            labels[name] = addr
        pending = []
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
            body = body.strip()
        opcode, _, operands = body.partition(" ")
        raw.append((addr, opcode, operands.strip(), pred))
    out = []
    for addr, opcode, operands, pred in raw:
        target = None
        if opcode.split(".")[0] in ("BRA", "JMP"):
            m = _TARGET_LABEL.search(operands)
            if m and m.group(1) in labels:
                target = labels[m.group(1)]
            else:
                m = _TARGET_HEX.search(operands)
                target = int(m.group(1), 16) if m else None
        out.append(Instruction(addr, opcode, operands, pred, target))
    return out


def basic_blocks(instrs: list[Instruction]) -> list[list[Instruction]]:
    """Split at branch targets and after control transfers."""
    if not instrs:
        return []
    leaders = {instrs[0].address} | {i.target for i in instrs if i.target is not None}
    for a, b in zip(instrs, instrs[1:]):
        if a.base in _ENDS_BLOCK:
            leaders.add(b.address)
    blocks: list[list[Instruction]] = []
    for ins in instrs:
        if ins.address in leaders or not blocks:
            blocks.append([])
        blocks[-1].append(ins)
    return blocks


@dataclass
class Loop:
    start: int  # header address (the backward branch's target)
    end: int  # address of the last backward branch to the header
    instructions: list[Instruction]
    depth: int = 0  # 0 = outermost
    inner: list["Loop"] = field(default_factory=list)  # directly nested loops

    def counts(self) -> dict[str, int]:
        """Static instruction counts by kind over the whole body (inner loops counted once)."""
        out = dict.fromkeys(KINDS, 0)
        for ins in self.instructions:
            out[ins.kind] += 1
        return out

    def contains(self, other: "Loop") -> bool:
        return other is not self and self.start <= other.start and other.end <= self.end


def find_loops(instrs: list[Instruction]) -> list[Loop]:
    """Loops from backward branches (target <= branch address), one per header, outermost first.

    Compilers lay a natural loop out contiguously from its header to its latch, so the body is the
    address range [header, last backward branch]. A branch to itself (the trap after EXIT) is no loop.
    """
    ends: dict[int, int] = {}
    for ins in instrs:
        if ins.target is not None and ins.target < ins.address:
            ends[ins.target] = max(ends.get(ins.target, ins.address), ins.address)
    loops = [Loop(s, e, [i for i in instrs if s <= i.address <= e]) for s, e in ends.items()]
    loops.sort(key=lambda lp: (lp.start, -lp.end))
    for lp in loops:
        parents = [p for p in loops if p.contains(lp)]
        lp.depth = len(parents)
        if parents:
            max(parents, key=lambda p: p.start).inner.append(lp)
    return loops


def loop_counts(loop: Loop, trips: dict[int, float] | None = None) -> dict[str, float]:
    """Instructions by kind executed in one iteration of `loop`, per thread.

    An instruction inside nested loops counts once per iteration of each of them: `trips` maps an
    inner loop's header address to its trip count (missing ones count 1, i.e. a static count).
    """
    trips = trips or {}
    nested: list[Loop] = []

    def collect(lp: Loop) -> None:
        for sub in lp.inner:
            nested.append(sub)
            collect(sub)

    collect(loop)
    out = dict.fromkeys(KINDS, 0.0)
    for ins in loop.instructions:
        weight = 1.0
        for sub in nested:
            if sub.start <= ins.address <= sub.end:
                weight *= trips.get(sub.start, 1)
        out[ins.kind] += weight
    return out


def per_score(count: float, *, threads: int, scores: int, iterations: float = 1) -> float:
    """Thread-instructions per score element: count x iterations x threads / scores (see top)."""
    return count * iterations * threads / scores
