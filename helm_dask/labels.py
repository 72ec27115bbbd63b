"""Label codes, colour lookup tables and the checking of manual hypothalamus segmentations: the code vocabulary
(FreeSurfer's 801-810 hypothalamic subunits and 250 fornix, k-means clusters 1..k numbered by increasing
centroid intensity, the paper's groups, the k limits), :class:`LabelTable` and :func:`load_label_table` for the
colour table and an optional renumbering of the outputs (``--label-table``), and
:func:`validate_manual_labels`/:func:`relabel` for manual segmentations.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .volume import like, provenance_record

__all__ = [
    "COLOURS",
    "DEFAULT_KS",
    "FORNIX",
    "GROUPS",
    "HYPOTHALAMUS",
    "HYPOTHALAMUS_LEFT",
    "HYPOTHALAMUS_RIGHT",
    "K_MAX",
    "K_MIN",
    "MANUAL_CODES",
    "PAPER_GROUPS",
    "RIGHT_CODES",
    "RIGHT_OFFSET",
    "RIGHT_TO_LEFT",
    "SHORT_NAMES",
    "SIDE_CODES",
    "LabelTable",
    "cluster_colour",
    "freesurfer_table",
    "label_counts",
    "load_label_table",
    "lut_table",
    "parse_label_map",
    "relabel",
    "validate_manual_labels",
    "write_lut",
]

# FreeSurferColorLUT.txt (FreeSurfer 7), lines 801-810 and 250.
HYPOTHALAMUS_LEFT: dict[int, str] = {
    801: "L_hypothalamus_anterior_inferior",
    802: "L_hypothalamus_anterior_superior",
    803: "L_hypothalamus_posterior",
    804: "L_hypothalamus_tubular_inferior",
    805: "L_hypothalamus_tubular_superior",
}
HYPOTHALAMUS_RIGHT: dict[int, str] = {c + 5: "R" + n[1:] for c, n in HYPOTHALAMUS_LEFT.items()}
HYPOTHALAMUS: dict[int, str] = {**HYPOTHALAMUS_LEFT, **HYPOTHALAMUS_RIGHT}
#: FreeSurfer's fornix code.
FORNIX = 250
FORNIX_NAME = "Fornix"
#: Every code a manual segmentation may contain (besides 0).
MANUAL_CODES: frozenset[int] = frozenset(HYPOTHALAMUS) | {FORNIX}

_RGB_LEFT = {801: (250, 255, 50), 802: (80, 200, 255), 803: (255, 160, 0), 804: (255, 160, 200), 805: (20, 180, 130)}
#: code -> (R, G, B, A) as in FreeSurferColorLUT.txt (the right side has the left side's colours there).
COLOURS: dict[int, tuple[int, int, int, int]] = {
    **{c: (*rgb, 0) for c, rgb in _RGB_LEFT.items()},
    **{c + 5: (*rgb, 0) for c, rgb in _RGB_LEFT.items()},
    FORNIX: (255, 0, 0, 0),
}

#: The paper's groupings for the validation metrics (both sides; a left hemisphere only has 801-805).
GROUPS: dict[str, tuple[int, ...]] = {
    "whole": tuple(range(801, 811)),
    "anterior": (801, 802, 806, 807),
    "tuberal": (804, 805, 809, 810),
    "posterior": (803, 808),
}

#: Display names of the manual codes (QC pages, metrics tables).
SHORT_NAMES: dict[int, str] = {
    **{
        c: "L " + n.split("hypothalamus_")[1].replace("_", "-").replace("tubular", "tuberal")
        for c, n in HYPOTHALAMUS_LEFT.items()
    },
    **{
        c + 5: "R " + n.split("hypothalamus_")[1].replace("_", "-").replace("tubular", "tuberal")
        for c, n in HYPOTHALAMUS_LEFT.items()
    },
    FORNIX: "fornix",
}
#: Hypothalamic subunit codes by side, in FreeSurfer's order (anterior-inferior, anterior-superior, posterior,
#: tuberal-inferior, tuberal-superior).
SIDE_CODES: dict[str, tuple[int, ...]] = {"L": tuple(HYPOTHALAMUS_LEFT), "R": tuple(HYPOTHALAMUS_RIGHT)}
#: Left -> right subunit codes (what mirroring renames on the mirrored side) and its inverse (what orientation
#: applies to a right hemisphere's manual labels). FreeSurfer's right codes are the left ones + 5.
RIGHT_CODES: dict[int, int] = dict(zip(SIDE_CODES["L"], SIDE_CODES["R"]))
RIGHT_TO_LEFT: dict[int, int] = {r: left for left, r in RIGHT_CODES.items()}
#: Offset between a left subunit code and its right twin.
RIGHT_OFFSET = 5
#: The HELM paper's groupings (Table 2), per side.
PAPER_GROUPS: dict[str, tuple[int, ...]] = {
    f"{side} {group}": tuple(c for c in codes if c in SIDE_CODES[side])
    for side in ("L", "R")
    for group, codes in (
        ("whole", GROUPS["whole"]),
        ("anterior", GROUPS["anterior"]),
        ("tuberal", GROUPS["tuberal"]),
        ("posterior", GROUPS["posterior"]),
    )
}
#: Numbers of k-means clusters accepted (--k) and the published default, k = 4..9.
K_MIN, K_MAX = 2, 20
DEFAULT_KS: tuple[int, ...] = (4, 5, 6, 7, 8, 9)

_MAX_CODE = 65535  # label maps are written as uint16


def cluster_colour(j: int, n: int) -> tuple[int, int, int, int]:
    """Grey level for k-means cluster ``j`` of ``n`` (dark = low intensity), with a faint alternating tint.

    Clusters are numbered by increasing centroid intensity, so a grey ramp reads like the image; the tint makes
    neighbouring clusters easier to tell apart.

    Parameters
    ----------
    j : int
        Cluster number, 1..n.
    n : int
        Number of clusters.

    Returns
    -------
    tuple of 4 int
        ``(R, G, B, A)``, A = 0 as in FreeSurfer's table.

    Example
    -------
    >>> cluster_colour(1, 4), cluster_colour(4, 4)
    ((52, 40, 28, 0), (228, 240, 252, 0))
    """
    n = max(int(n), 2)
    g = 40 + round(200 * (int(j) - 1) / (n - 1))
    tint = 12 if j % 2 else -12
    return (int(np.clip(g + tint, 0, 255)), int(np.clip(g, 0, 255)), int(np.clip(g - tint, 0, 255)), 0)


def _norm_name(name: str) -> str:
    """Spelling-insensitive key for matching label names across tables."""
    alias = {
        "left": "l",
        "lh": "l",
        "right": "r",
        "rh": "r",
        "tuberal": "tubular",
        "hypothalamic": "hypothalamus",
        "ant": "anterior",
        "post": "posterior",
        "inf": "inferior",
        "sup": "superior",
        "km": "kmeans",
    }
    toks = [t for t in re.split(r"[^0-9a-z]+", name.lower()) if t]
    toks = [alias.get(t, t) for t in toks]
    if toks and toks[0] in ("kmeans", "cluster") and toks[-1].isdigit():
        return "cluster" + toks[-1]
    return "".join(toks)


def _check_rgba(code: int, rgba: Iterable[Any]) -> tuple[int, int, int, int]:
    v = [int(x) for x in rgba]
    if len(v) == 3:
        v.append(0)
    if len(v) != 4 or any(x < 0 or x > 255 for x in v):
        raise HelmError(f"label {code}: colour must be 3 or 4 integers in 0..255, got {list(rgba)!r}")
    return v[0], v[1], v[2], v[3]


@dataclass
class LabelTable:
    """A colour table plus an optional renumbering of helm-dask's codes.

    Attributes
    ----------
    name : str
        ``"freesurfer"`` for the built-in table, otherwise where it came from.
    entries : dict
        output code -> (name, (R, G, B, A)); what :meth:`to_colorlut` writes.
    code_map : dict
        helm-dask code -> output code; codes absent from it keep their value (identity for ``"freesurfer"``).

    Example
    -------
    >>> t = LabelTable("demo", {0: ("Unknown", (0, 0, 0, 0)), 11: ("hyp-ai", (250, 255, 50, 0))}, {801: 11})
    >>> t.out_code(801), t.out_code(3)
    (11, 3)
    """

    name: str
    entries: dict[int, tuple[str, tuple[int, int, int, int]]]
    code_map: dict[int, int] = field(default_factory=dict)

    def __post_init__(self):
        self.entries = {int(c): (str(n), _check_rgba(c, rgba)) for c, (n, rgba) in self.entries.items()}
        self.code_map = {int(a): int(b) for a, b in self.code_map.items() if int(a) != int(b)}
        for c in list(self.entries) + list(self.code_map) + list(self.code_map.values()):
            if c < 0 or c > _MAX_CODE:
                raise HelmError(f"label table {self.name!r}: code {c} is outside 0..{_MAX_CODE} (uint16 label maps)")
        for c, (n, _) in self.entries.items():
            if not n or any(ch.isspace() for ch in n):
                raise HelmError(
                    f"label table {self.name!r}: name of code {c} must be one word (ColorLUT format), got {n!r}"
                )
        if 0 in self.code_map or 0 in self.code_map.values():
            raise HelmError(f"label table {self.name!r}: background 0 cannot be renumbered, nor a label mapped to 0")
        self._check_distinct(MANUAL_CODES | set(self.code_map))

    def _check_distinct(self, ours: Iterable[int]) -> None:
        """Two of our codes must never share an output code (mapped or left as they are)."""
        seen: dict[int, int] = {}
        for a in sorted(set(ours) | {0}):
            b = self.out_code(a)
            if b in seen:
                raise HelmError(
                    f"label table {self.name!r} gives codes {seen[b]} and {a} the same output code {b}",
                    hint="every code needs its own output code: map the other one too",
                )
            seen[b] = a

    def out_code(self, code: int) -> int:
        """The output code of one of our codes.

        Parameters
        ----------
        code : int
            A helm-dask code.

        Returns
        -------
        int
            Its output code (itself when the table does not renumber it).
        """
        return self.code_map.get(int(code), int(code))

    def with_clusters(self, n: int) -> LabelTable:
        """A copy with entries for k-means clusters 1..n (``kmeans-cluster-J``) where the table has none.

        Parameters
        ----------
        n : int
            Number of clusters.

        Returns
        -------
        LabelTable
        """
        self._check_distinct(MANUAL_CODES | set(self.code_map) | set(range(1, int(n) + 1)))
        entries = dict(self.entries)
        for j in range(1, int(n) + 1):
            entries.setdefault(self.out_code(j), (f"kmeans-cluster-{j}", cluster_colour(j, n)))
        return LabelTable(self.name, entries, dict(self.code_map))

    def to_colorlut(self, path: str | os.PathLike) -> Path:
        """Write the entries as a FreeSurfer ColorLUT text file.

        Parameters
        ----------
        path : path-like
            The file written.

        Returns
        -------
        pathlib.Path
            ``path``.
        """
        p = Path(path)
        p.write_text(self.colorlut_text())
        return p

    def colorlut_text(self) -> str:
        """The entries as the text of a FreeSurfer ColorLUT file.

        Returns
        -------
        str
            Comment lines (the table's name; with k-means clusters, a warning that their codes are not
            FreeSurfer's structures, see :func:`_cluster_warning`), then ``code name R G B A`` per entry (0
            ``Unknown`` added when missing).
        """
        lines = [
            f"# helm-dask colour table ({self.name}); FreeSurfer ColorLUT format",
            *_cluster_warning(self.entries),
            "#No. Label Name:                            R   G   B   A",
        ]
        entries = dict(self.entries)
        entries.setdefault(0, ("Unknown", (0, 0, 0, 0)))
        for c in sorted(entries):
            n, (r, g, b, a) = entries[c]
            lines.append(f"{c:<5d} {n:<40s} {r:3d} {g:3d} {b:3d} {a:3d}")
        return "\n".join(lines) + "\n"

    @classmethod
    def from_colorlut(cls, path: str | os.PathLike, *, name: str | None = None) -> LabelTable:
        """Read a FreeSurfer ColorLUT (``code name R G B [A]`` lines, ``#`` comments).

        Parameters
        ----------
        path : path-like
            The ColorLUT file.
        name : str, optional
            The table's name; default the path.

        Returns
        -------
        LabelTable
            Its entries, identity code map.
        """
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as e:
            raise HelmError(f"cannot read the colour table: {e.strerror or e}", path=p) from None
        entries = {}
        for i, line in enumerate(text.splitlines(), 1):
            f = line.split("#", 1)[0].split()
            if not f:
                continue
            try:
                code = int(f[0])
                entries[code] = (f[1], _check_rgba(code, f[2:6]))
            except (ValueError, IndexError, HelmError):
                raise HelmError(
                    f"line {i} is not a ColorLUT entry ('code name R G B A', colours 0..255): {line.strip()!r}", path=p
                ) from None
        if not entries:
            raise HelmError("no entries in this colour table", path=p)
        return cls(name or str(p), entries)

    def relabel(self, vol: xr.DataArray) -> xr.DataArray:
        """Apply :attr:`code_map` to a label volume.

        Parameters
        ----------
        vol : xarray.DataArray
            A label volume.

        Returns
        -------
        xarray.DataArray
            Lazy uint16 labels; ``vol`` itself for an identity map.
        """
        if not self.code_map:
            return vol
        return relabel(vol, self.code_map, stage="labels.LabelTable.relabel")

    def to_dict(self) -> dict:
        """JSON-able form (for provenance records).

        Returns
        -------
        dict
            ``name``, ``code_map`` and ``entries`` with string keys.
        """
        return {
            "name": self.name,
            "code_map": {str(a): b for a, b in sorted(self.code_map.items())},
            "entries": {str(c): [n, list(rgba)] for c, (n, rgba) in sorted(self.entries.items())},
        }


def _code_list(codes: list[int]) -> str:
    """``[1, 2, 3, 5]`` as ``"1-3, 5"``."""
    runs: list[list[int]] = []
    for c in sorted(codes):
        if runs and c == runs[-1][-1] + 1:
            runs[-1].append(c)
        else:
            runs.append([c])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs)


def _cluster_warning(entries: Mapping[int, tuple[str, Any]]) -> list[str]:
    """The ColorLUT comment lines that say which codes are k-means clusters (none without clusters).

    The clusters are numbered 1..k, and FreeSurferColorLUT.txt gives those numbers to cortex, white matter and
    ventricles: a map opened with FreeSurfer's own table would look like a segmentation it is not. Lines start
    with ``#``, which every ColorLUT reader (freeview, ``read_fscolorlut``) skips.
    """
    clusters = [c for c, (n, _) in entries.items() if re.fullmatch(r"kmeans-cluster-\d+", n)]
    if not clusters:
        return []
    lines = [
        f"# WARNING: codes {_code_list(clusters)} are k-means clusters, not FreeSurfer structures: kmeans-cluster-J is",
        "# cluster J (of k), numbered by increasing centroid intensity; 0 = outside the brain. FreeSurferColorLUT.txt",
    ]
    if {2, 3, 4} <= set(clusters):
        lines += [
            "# gives these numbers to other structures (2 Left-Cerebral-White-Matter, 3 Left-Cerebral-Cortex,",
            "# 4 Left-Lateral-Ventricle, ...): open the label maps with this table, never with FreeSurferColorLUT.txt.",
        ]
    else:
        lines += [
            "# gives these numbers to other structures: open the label maps with this table, never with",
            "# FreeSurferColorLUT.txt.",
        ]
    fs_names = {**HYPOTHALAMUS, FORNIX: FORNIX_NAME}
    if all(entries.get(c, ("",))[0] == n for c, n in fs_names.items()):
        lines.append("# 801-810 (hypothalamic subunits) and 250 (fornix) are FreeSurfer's own codes and names.")
    return lines


def freesurfer_table() -> LabelTable:
    """The built-in table: FreeSurfer's codes, names and colours for 801-810 and 250 (identity numbering).

    Returns
    -------
    LabelTable

    Example
    -------
    >>> t = freesurfer_table().with_clusters(4)
    >>> t.entries[801][0], t.entries[801][1], t.entries[1][0]
    ('L_hypothalamus_anterior_inferior', (250, 255, 50, 0), 'kmeans-cluster-1')
    """
    entries = {0: ("Unknown", (0, 0, 0, 0))}
    entries.update({c: (n, COLOURS[c]) for c, n in HYPOTHALAMUS.items()})
    entries[FORNIX] = (FORNIX_NAME, COLOURS[FORNIX])
    return LabelTable("freesurfer", entries)


def _our_names(n_clusters: int = 99) -> dict[str, int]:
    names = {_norm_name(n): c for c, n in HYPOTHALAMUS.items()}
    names[_norm_name(FORNIX_NAME)] = FORNIX
    names.update({f"cluster{j}": j for j in range(1, n_clusters + 1)})
    return names


def load_label_table(spec: Any = "freesurfer") -> LabelTable:
    """The table for ``--label-table``: ``"freesurfer"``, a :class:`LabelTable`, or a JSON / TSV / ColorLUT path.

    The numbering of the published HELM label maps is not built into the package (the maps are not shipped
    with it), so ``"published"`` on its own is refused with an explanation: pass their colour table (or a code
    map) instead. Codes not in a mapping keep their value; a mapping that sends two codes to the same output is
    an error.

    Parameters
    ----------
    spec : str, path-like or LabelTable
        * ``"freesurfer"`` -- the built-in default (identity mapping, FreeSurfer's names and colours);
        * ``path.json`` -- ``{"name": ..., "map": {"801": 11, ...}, "entries": {"11": ["name", [R, G, B, A]],
          ...}}`` (``entries`` optional), or just a flat ``{"801": 11, ...}``;
        * ``path.tsv`` / ``path.csv`` -- rows ``our_code  output_code  [name  R  G  B  [A]]`` (tab, comma or
          blanks; lines starting with ``#`` or a non-numeric first field are skipped);
        * any other file -- a FreeSurfer ColorLUT (``#No. Label Name: R G B A``, e.g. the one shipped with the
          published maps): its entries are matched to ours **by name** (case, ``-``/``_`` and the spellings
          left/L, right/R, tuberal/tubular are ignored; clusters match ``kmeans-cluster-J`` or ``cluster-J``);
          codes that match nothing keep their value.

    Returns
    -------
    LabelTable
    """
    if isinstance(spec, LabelTable):
        return spec
    if spec is None or str(spec).lower() == "freesurfer":
        return freesurfer_table()
    if str(spec).lower() == "published":
        raise HelmError(
            "the numbering of the published HELM label maps is not built into helm-dask",
            hint="pass the published maps' ColorLUT (matched by label name) or a code map "
            "(.json {\"801\": CODE, ...} or .tsv 'our_code output_code [name R G B A]') "
            "with --label-table PATH",
        )
    p = Path(spec)
    if not p.exists():
        raise HelmError(
            "no such label table file", path=p, hint="use --label-table freesurfer or a .json / .tsv / ColorLUT file"
        )
    suffix = p.suffix.lower()
    if suffix == ".json":
        return _table_from_json(p)
    if suffix in (".tsv", ".csv"):
        return _table_from_tsv(p)
    return _table_from_named_lut(p)


def _table_from_json(p: Path) -> LabelTable:
    try:
        d = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise HelmError(f"cannot read this JSON label table: {e}", path=p) from None
    if not isinstance(d, dict):
        raise HelmError("a JSON label table is an object", path=p, hint='e.g. {"map": {"801": 11}}')
    cmap = d.get("map", d if "entries" not in d and "name" not in d else {})
    try:
        cmap = {int(a): int(b) for a, b in cmap.items()}
        entries_in = {int(c): (v[0], v[1]) for c, v in d.get("entries", {}).items()}
    except (ValueError, TypeError, IndexError, AttributeError):
        raise HelmError(
            "malformed JSON label table",
            path=p,
            hint='expected {"map": {"801": 11, ...}, "entries": {"11": ["name", [R, G, B, A]]}}',
        ) from None
    return _complete(str(d.get("name", p)), cmap, entries_in)


def _table_from_tsv(p: Path) -> LabelTable:
    try:
        text = p.read_text()
    except OSError as e:
        raise HelmError(f"cannot read the label table: {e.strerror or e}", path=p) from None
    cmap: dict[int, int] = {}
    entries_in: dict[int, tuple[str, list[int] | None]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        f = [x.strip() for x in (next(csv.reader(io.StringIO(line))) if "," in line else line.split())]
        f = [x for x in f if x != ""]
        if not f[0].lstrip("-").isdigit():
            continue  # header row
        try:
            a, b = int(f[0]), int(f[1])
            cmap[a] = b
            if len(f) >= 6:
                entries_in[b] = (f[2], [int(x) for x in f[3:7]])
            elif len(f) >= 3:
                entries_in[b] = (f[2], None)
        except (ValueError, IndexError):
            raise HelmError(
                f"line {i}: expected 'our_code output_code [name R G B A]', got {line.strip()!r}", path=p
            ) from None
    return _complete(str(p), cmap, entries_in)


def _table_from_named_lut(p: Path) -> LabelTable:
    lut = LabelTable.from_colorlut(p)
    ours = _our_names()
    cmap, matched = {}, set()
    for code, (n, _) in lut.entries.items():
        key = _norm_name(n)
        if key in ours:
            cmap[ours[key]] = code
            matched.add(ours[key])
    if not matched & set(HYPOTHALAMUS):
        raise HelmError(
            "no entry of this colour table matches a hypothalamus label by name (e.g. "
            f"{HYPOTHALAMUS[801]!r}): cannot tell how it numbers them",
            path=p,
            hint="give an explicit code map instead (.json or .tsv, see helm_dask.labels)",
        )
    return LabelTable(str(p), lut.entries, cmap)


def _complete(name: str, cmap: dict[int, int], entries_in: dict) -> LabelTable:
    """Entries for a mapped table: given names/colours, else ours (FreeSurfer's) carried to the output code."""
    base = freesurfer_table().entries
    entries = {0: base[0]}
    back = {b: a for a, b in cmap.items()}
    for c, (n, rgba) in base.items():
        if c and c not in cmap:
            entries[c] = (n, rgba)
    for b, a in back.items():
        if a in base:
            entries[b] = base[a]
    for b, (n, rgba) in entries_in.items():
        a = back.get(b, b)
        if rgba is None:  # a name without a colour: our colour for that code, grey for anything else
            rgba = base[a][1] if a in base else cluster_colour(a, 9) if 1 <= a <= 99 else (128, 128, 128, 0)
        entries[b] = (n, rgba)
    return LabelTable(name, entries, cmap)


def write_lut(path: str | os.PathLike, table: Any = "freesurfer", ks: Iterable[int] = (4, 5, 6, 7, 8, 9)) -> Path:
    """Write the colour table (``lut.txt`` next to the maps), with k-means clusters 1..max(ks).

    Parameters
    ----------
    path : path-like
        The file written (FreeSurfer ColorLUT format).
    table : str, path-like or LabelTable
        As :func:`load_label_table` takes.
    ks : iterable of int
        The k values of the run.

    Returns
    -------
    pathlib.Path
        ``path``.

    Example
    -------
    >>> import tempfile, os
    >>> p = write_lut(os.path.join(tempfile.mkdtemp(), "lut.txt"), ks=(4, 5))
    >>> p.read_text().splitlines()[1]
    '# WARNING: codes 1-5 are k-means clusters, not FreeSurfer structures: kmeans-cluster-J is'
    >>> rows = [l.split() for l in p.read_text().splitlines() if not l.startswith("#")]
    >>> [r[:2] for r in rows[:2]] + [rows[-1]]
    [['0', 'Unknown'], ['1', 'kmeans-cluster-1'], ['810', 'R_hypothalamus_tubular_superior', '20', '180', '130', '0']]
    """
    return lut_table(table, ks).to_colorlut(path)


def lut_table(table: Any = "freesurfer", ks: Iterable[int] = (4, 5, 6, 7, 8, 9)) -> LabelTable:
    """The label table with k-means clusters 1..max(ks): what :func:`write_lut` writes.

    Parameters
    ----------
    table : str, path-like or LabelTable
        As :func:`load_label_table` takes.
    ks : iterable of int
        The k values of the run.

    Returns
    -------
    LabelTable
    """
    ks = list(ks)
    return load_label_table(table).with_clusters(max(ks) if ks else 0)


def label_colours(table: Any = "freesurfer", ks: Iterable[int] = DEFAULT_KS) -> dict[int, tuple[str, tuple[int, ...]]]:
    """Name and colour of every code a run's label maps hold, from its label table: the stores' OME ``image-label``.

    Keyed by the codes in the maps (a table that renumbers gives its colour to the code it renumbers), colours as
    ``(R, G, B, A)`` with A = opacity (ColorLUT's fourth column is transparency: A = 255 - it); 0 is transparent.

    Parameters
    ----------
    table : str, path-like or LabelTable
        As :func:`load_label_table` takes.
    ks : iterable of int
        The k values of the run (clusters 1..max(ks) are coloured as in :func:`lut_table`).

    Returns
    -------
    dict
        ``{code: (name, (R, G, B, A))}``, sorted by code.

    Example
    -------
    >>> c = label_colours(ks=(4,))
    >>> c[0], c[1][0], c[801]
    (('Unknown', (0, 0, 0, 0)), 'kmeans-cluster-1', ('L_hypothalamus_anterior_inferior', (250, 255, 50, 255)))
    """
    t = lut_table(table, ks)
    back = {out: ours for ours, out in t.code_map.items()}
    out: dict[int, tuple[str, tuple[int, ...]]] = {}
    for mapped in (False, True):  # a renumbered code's colour wins over an entry that merely has its number
        for code, (name, (r, g, b, a)) in t.entries.items():
            if (code in back) == mapped:
                out[back.get(code, code)] = (name, (r, g, b, 255 - a))
    out[0] = (out.get(0, ("Unknown", ()))[0], (0, 0, 0, 0))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# manual segmentations
# ----------------------------------------------------------------------------------------------------------


def parse_label_map(items: Any) -> dict[int, int]:
    """``--label-map`` values as a mapping of codes.

    Parameters
    ----------
    items : str, list of str, mapping or None
        ``"5=801"``, ``"5=801,6=0"``, a list of those, or a mapping.

    Returns
    -------
    dict of int to int
        Empty for no items; HelmError for anything that is not integer ``CODE=CODE`` pairs.

    Example
    -------
    >>> parse_label_map(["5=801", "6=0,7=802"]), parse_label_map({"9": 250})
    ({5: 801, 6: 0, 7: 802}, {9: 250})
    """
    if not items:
        return {}
    pairs: list[tuple[Any, ...]]
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        if isinstance(items, str):
            items = [items]
        pairs = []
        for it in items:
            for part in str(it).split(","):
                if not part.strip():
                    continue
                if "=" not in part:
                    raise HelmError(
                        f"--label-map expects CODE=CODE, got {part.strip()!r}", hint="e.g. --label-map 5=801"
                    )
                pairs.append(tuple(part.split("=", 1)))
    out = {}
    for a, b in pairs:
        try:
            fa, fb = float(a), float(b)
        except (TypeError, ValueError):
            raise HelmError(f"--label-map expects integer codes, got {a}={b}", hint="e.g. --label-map 5=801") from None
        if fa != int(fa) or fb != int(fb):
            raise HelmError(f"--label-map expects integer codes, got {a}={b}", hint="e.g. --label-map 5=801")
        out[int(fa)] = int(fb)
    return out


def _unique_counts(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.unique(block, return_counts=True)


def label_counts(vol: Any) -> dict:
    """Voxel count of every value of a label volume, by a chunked unique (one small task per chunk; eager).

    Parameters
    ----------
    vol : xarray.DataArray or array_like
        The labels (any dtype).

    Returns
    -------
    dict
        ``{value: count}`` sorted by value (integral values as int).

    Example
    -------
    >>> label_counts(da.from_array(np.array([0, 0, 801, 5]), chunks=2))
    {0: 2, 5: 1, 801: 1}
    """
    data = vol.data if isinstance(vol, xr.DataArray) else vol
    data = data if isinstance(data, da.Array) else da.asarray(data)
    parts = dask.compute(*[dask.delayed(_unique_counts)(b) for b in data.to_delayed().ravel()])
    total: dict = {}
    for vals, cnts in parts:
        for v, c in zip(vals.tolist(), cnts.tolist()):
            total[v] = total.get(v, 0) + int(c)
    return {(int(v) if float(v).is_integer() else v): total[v] for v in sorted(total)}


def _relabel_block(block: np.ndarray, keys: np.ndarray, vals: np.ndarray) -> np.ndarray:
    b = block.astype(np.int64)
    if keys.size:
        idx = np.clip(np.searchsorted(keys, b), 0, keys.size - 1)
        hit = keys[idx] == b
        b = np.where(hit, vals[idx], b)
    return b.astype(np.uint16)


def relabel(vol: xr.DataArray, mapping: Mapping[int, int], *, stage: str = "labels.relabel") -> xr.DataArray:
    """Replace codes by ``mapping`` (others unchanged), lazily, as a uint16 ``kind="labels"`` volume.

    Parameters
    ----------
    vol : xarray.DataArray
        Integer values that fit uint16 after mapping (see :func:`validate_manual_labels`).
    mapping : mapping of int to int
        Old code -> new code.
    stage : str
        Name of the provenance step.

    Returns
    -------
    xarray.DataArray

    Example
    -------
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.from_array(np.array([0, 5, 801], np.int32).reshape(3, 1, 1)), np.eye(4))
    >>> relabel(v, {5: 802}).values.ravel().tolist()
    [0, 802, 801]
    """
    data = vol.data if isinstance(vol.data, da.Array) else da.asarray(vol.data)
    m = {int(a): int(b) for a, b in mapping.items()}
    keys = np.array(sorted(m), dtype=np.int64)
    vals = np.array([m[k] for k in keys.tolist()], dtype=np.int64)
    if not m and data.dtype == np.uint16:
        new = data
    else:
        new = da.map_blocks(_relabel_block, data, keys=keys, vals=vals, dtype=np.uint16)
    return like(
        vol, new, kind="labels", step=provenance_record(stage, {"mapping": {str(a): b for a, b in sorted(m.items())}})
    )


def _fmt_codes(codes: list, counts: dict, limit: int = 20) -> str:
    shown = ", ".join(f"{c} ({counts[c]} voxel{'' if counts[c] == 1 else 's'})" for c in codes[:limit])
    return shown + (f" and {len(codes) - limit} more" if len(codes) > limit else "")


def validate_manual_labels(
    labels_vol: xr.DataArray,
    *,
    allowed: Iterable[int] | None = None,
    path: str | os.PathLike | None = None,
    mapping: Any = None,
) -> xr.DataArray:
    """Check the codes of a manual segmentation and apply an explicit ``--label-map``; lazy result.

    One chunked unique pass over the volume is computed eagerly (small: the values present and their counts).

    Parameters
    ----------
    labels_vol : xarray.DataArray
        The manual segmentation (any integer or float dtype holding integer values).
    allowed : iterable of int, optional
        Codes accepted besides 0; default :data:`MANUAL_CODES` (801-810 and the fornix 250).
    path : str, optional
        The file it came from, for the error messages.
    mapping : dict or list of "A=B", optional
        Explicit renumbering applied first (``B = 0`` removes label ``A``); every ``B`` must be allowed or 0.

    Returns
    -------
    xarray.DataArray
        The labels as uint16 with the mapping applied (``kind="labels"``).

    Raises
    ------
    HelmError
        Values that are not allowed codes (listed, with voxel counts; non-integer, negative and too large values
        included), a mapping to a code that is not allowed, or no hypothalamus label (801-810) at all.

    Example
    -------
    >>> import numpy as np, dask.array as da
    >>> from helm_dask.volume import make_volume
    >>> v = make_volume(da.from_array(np.array([0, 5, 801, 250], np.int32).reshape(4, 1, 1)), np.eye(4),
    ...                 kind="labels")
    >>> validate_manual_labels(v, mapping={5: 802}).values.ravel().tolist()
    [0, 802, 801, 250]
    >>> validate_manual_labels(v)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    helm_dask.errors.HelmError: the manual segmentation contains values that are not label codes: 5 (1 voxel). ...
    """
    allowed_set = set(MANUAL_CODES if allowed is None else (int(a) for a in allowed)) | {0}
    m = parse_label_map(mapping)
    bad_targets = sorted({b for b in m.values() if b not in allowed_set})
    if bad_targets:
        raise HelmError(
            f"--label-map sends codes to {bad_targets}, which are not manual label codes",
            path=path,
            hint=f"map to one of {_allowed_text(allowed_set)} or to 0 (remove)",
        )
    counts = label_counts(labels_vol)
    unknown = []
    for v in counts:
        if isinstance(v, float) or v not in m and v not in allowed_set:
            unknown.append(v)
    if unknown:
        raise HelmError(
            f"the manual segmentation contains values that are not label codes: {_fmt_codes(unknown, counts)}",
            path=path,
            hint=f"map them with --label-map CODE=CODE or remove them (CODE=0); known codes: "
            f"{_allowed_text(allowed_set)}",
        )
    present = {m.get(v, v) for v, c in counts.items() if c > 0}
    if not present & set(HYPOTHALAMUS):
        found = ", ".join(str(v) for v in sorted(present)) or "nothing"
        raise HelmError(
            f"the manual segmentation has no hypothalamus label (801-810); it contains {found}",
            path=path,
            hint="pass the hypothalamus segmentation (FreeSurfer codes 801-810), or map "
            "its codes with --label-map CODE=CODE",
        )
    out = relabel(labels_vol, {a: b for a, b in m.items() if a in counts}, stage="labels.validate_manual_labels")
    return out


def _allowed_text(allowed: set[int]) -> str:
    codes = sorted(allowed - {0})
    if set(HYPOTHALAMUS) <= allowed:
        rest = [c for c in codes if c not in HYPOTHALAMUS]
        parts = ["801-810 (hypothalamus)"] + [f"{c} (fornix)" if c == FORNIX else str(c) for c in rest]
        return ", ".join(parts)
    return ", ".join(str(c) for c in codes)
