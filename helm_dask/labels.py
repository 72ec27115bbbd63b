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

import dask.array as da
import numpy as np
import xarray as xr

from .errors import HelmError
from .volume import like, provenance_record

__all__ = [
    "COLOURS",
    "DEFAULT_KS",
    "HELM_TABLE_TEXT",
    "MIRRORED_FORNIX",
    "ExtraLabel",
    "check_extra_labels",
    "extra_right_to_left",
    "helm_table",
    "lut_tables",
    "parse_extra_labels",
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
#: The fornix on the mirrored side, as a label table names it (``250R``): FreeSurfer has one fornix code, so the
#: default mirror keeps 250 on both sides; a table that numbers the two fornices apart maps this key. It is never a
#: voxel value (``--extra-labels`` and tables refuse it).
MIRRORED_FORNIX = _MAX_CODE

#: ``--label-table helm``: the numbering of the published HELM maps, derived from the authors' code (repository
#: liviamarodrigues/hsynex). ``label_maps/mesh.py`` keeps clusters (<= k) and raises the codes above k of the
#: acquired hemisphere -- the x < 0 side, i.e. left -- by the map's maximum (``img_left[img_left>k_] += max_val``,
#: max_val = k + 6), the mirrored (right) side keeping them; ``training/label2img.py`` places the 12 channels after the
#: k clusters in two sides of six, anterior at offsets 0 and 5 (``anterior = [k_, k_+5, k_+6, k_+11]``) and the
#: fornix at 4 (``idx != k_+4 and idx != k_+10``). Which anterior code is inferior and which of offsets 1-3 is
#: posterior / tuberal-inferior / tuberal-superior the code does not say: here FreeSurfer's order is assumed
#: (801 first, then 803, 804, 805; 802 last). A table file with the same rows overrides it.
HELM_TABLE_TEXT = """\
# our_code  output_code  name
# right (mirrored) side: k+1 .. k+6, as the authors' mesh.py leaves it
806   k+1    R_hypothalamus_anterior_inferior
808   k+2    R_hypothalamus_posterior
809   k+3    R_hypothalamus_tubular_inferior
810   k+4    R_hypothalamus_tubular_superior
250R  k+5    R_fornix
807   k+6    R_hypothalamus_anterior_superior
# left (acquired) side: the same + max_val (k+6): 2k+7 .. 2k+12
801   2k+7   L_hypothalamus_anterior_inferior
803   2k+8   L_hypothalamus_posterior
804   2k+9   L_hypothalamus_tubular_inferior
805   2k+10  L_hypothalamus_tubular_superior
250   2k+11  L_fornix
802   2k+12  L_hypothalamus_anterior_superior
"""
HELM_NOTES = (
    "HELM numbering (hsynex label_maps/mesh.py, training/label2img.py): clusters 1..k, right side k+1..k+6,",
    "left (acquired) side 2k+7..2k+12 (+ max_val = k+6); anterior at offsets 1 and 6, fornix at 5. The authors'",
    "code does not say which anterior code is inferior, nor which of offsets 2-4 is posterior / tuberal-inferior /",
    "tuberal-superior: FreeSurfer's order is assumed here (override with --label-table FILE).",
)


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
    #: k-dependent rows ``(our_code, a, b, name or None, rgba or None)``: output code ``a k + b``
    #: (:meth:`for_k` makes them concrete); empty for a table that does not depend on k.
    k_rows: tuple = ()
    #: Comment lines for the ColorLUT header (e.g. what the numbering leaves open).
    notes: tuple = ()

    def __post_init__(self):
        self.k_rows = tuple(self.k_rows)
        self.notes = tuple(self.notes)
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

    @property
    def k_dependent(self) -> bool:
        """Whether the output codes depend on k (``--label-table helm``, or a table file with ``k`` in a code)."""
        return bool(self.k_rows)

    def for_k(self, k: int) -> LabelTable:
        """The concrete table for ``k`` clusters (``self`` when the table does not depend on k).

        Parameters
        ----------
        k : int
            Number of k-means clusters.

        Returns
        -------
        LabelTable
            With every k-dependent row evaluated (``a k + b``); our entry of a renumbered code moves to its
            output code.

        Example
        -------
        >>> t = load_label_table("helm").for_k(4)
        >>> t.out_code(806), t.out_code(801), t.out_code(FORNIX), t.out_code(MIRRORED_FORNIX)
        (5, 15, 19, 9)
        """
        if not self.k_rows:
            return self
        k = int(k)
        cmap = dict(self.code_map)
        entries = dict(self.entries)
        base = freesurfer_table().entries
        rows = [(our, a * k + b, n, rgba) for our, a, b, n, rgba in self.k_rows]
        for our, out, _, _ in rows:
            cmap[our] = out
            if our in entries and our not in [o for _, o, _, _ in rows] and our not in cmap.values():
                del entries[our]  # our code's entry moves to its output code
        for our, out, n, rgba in rows:
            ours = base.get(FORNIX if our == MIRRORED_FORNIX else our, (f"label-{our}", (128, 128, 128, 0)))
            entries[out] = (n or ours[0], rgba if rgba is not None else ours[1])
        if any(out <= k for _, out, _, _ in rows):
            raise HelmError(
                f"label table {self.name!r}: with k = {k} it gives a label a code <= {k}, a k-means cluster's",
                hint="make the table's codes larger than k (e.g. k+1, 2k+7)",
            )
        return LabelTable(f"{self.name}, k = {k}", entries, cmap, notes=self.notes)

    def right_codes(self) -> dict[int, int]:
        """Left -> right output codes for the mirror (the table's numbering of :data:`RIGHT_CODES`, and of the fornix
        when the table numbers the mirrored one apart, as a ``250R`` row does).

        Returns
        -------
        dict of int to int

        Example
        -------
        >>> load_label_table("helm").for_k(4).right_codes()[15], freesurfer_table().right_codes()[801]
        (5, 806)
        """
        out = {self.out_code(a): self.out_code(b) for a, b in RIGHT_CODES.items()}
        if MIRRORED_FORNIX in self.code_map:
            out[self.out_code(FORNIX)] = self.out_code(MIRRORED_FORNIX)
        return out

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
        return LabelTable(self.name, entries, dict(self.code_map), self.k_rows, self.notes)

    def with_extras(self, extras: Iterable[ExtraLabel]) -> LabelTable:
        """A copy with entries for ``--extra-labels`` (both sides; a code the table renumbers keeps its entry).

        Parameters
        ----------
        extras : iterable of ExtraLabel
            From :func:`parse_extra_labels`.

        Returns
        -------
        LabelTable
        """
        entries = dict(self.entries)
        for e in extras:
            for code, side in ((e.left, "L"), (e.right, "R")):
                if code in self.code_map or (code == FORNIX and MIRRORED_FORNIX in self.code_map):
                    continue  # the table numbers it (the fornix of --label-table helm)
                name = e.name if e.left == e.right else f"{side}_{e.name}"
                entries[code] = (name, e.rgba or cluster_colour(code % 7 + 1, 8))
        return LabelTable(self.name, entries, dict(self.code_map), self.k_rows, self.notes)

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
            *(f"# {n}" for n in self.notes),
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

    ``"helm"`` is the published maps' numbering as the authors' code gives it (:func:`helm_table`; it depends on
    k); ``"published"`` is refused with an explanation (the maps themselves are not shipped, so their own colour
    table cannot be checked). Codes not in a mapping keep their value; a mapping that sends two codes to the
    same output is an error.

    Parameters
    ----------
    spec : str, path-like or LabelTable
        * ``"freesurfer"`` -- the built-in default (identity mapping, FreeSurfer's names and colours);
        * ``"helm"`` -- :func:`helm_table`;
        * ``path.json`` -- ``{"name": ..., "map": {"801": 11, ...}, "entries": {"11": ["name", [R, G, B, A]],
          ...}}`` (``entries`` optional), or just a flat ``{"801": 11, ...}``;
        * ``path.tsv`` / ``path.csv`` -- rows ``our_code  output_code  [name  R  G  B  [A]]`` (tab, comma or
          blanks; lines starting with ``#`` or a non-numeric first field are skipped); an output code may depend
          on k (``k+1``, ``2k+7``, ``2*k+7``) and ``250R`` numbers the fornix of the mirrored side apart (the rows
          of :data:`HELM_TABLE_TEXT` are an example);
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
    if str(spec).lower() == "helm":
        return helm_table()
    if str(spec).lower() == "published":
        raise HelmError(
            "the numbering of the published HELM label maps is not built into helm-dask",
            hint="use --label-table helm (derived from the authors' code), the published maps' ColorLUT "
            "(matched by label name) or a code map "
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
    return _table_from_rows(text, str(p), p)


_K_EXPR = re.compile(r"^(?:(\d*)\s*\*?\s*k)?\s*(?:([+-])\s*(\d+))?$")


def _k_expr(text: str) -> tuple[int, int] | None:
    """``"2k+7"`` -> ``(2, 7)`` (``a k + b``); ``"17"`` -> ``(0, 17)``; None when it is neither."""
    t = text.strip().lower()
    if t.lstrip("-").isdigit():
        return 0, int(t)
    m = _K_EXPR.fullmatch(t)
    if not m or "k" not in t:
        return None
    a = int(m.group(1)) if m.group(1) else 1
    b = int(m.group(3) or 0) * (-1 if m.group(2) == "-" else 1)
    return a, b


def _table_from_rows(text: str, name: str, path: Any = None, notes: tuple = ()) -> LabelTable:
    """Rows ``our_code output_code [name [R G B [A]]]``; an output code may depend on k (``k+1``, ``2k+7``,
    ``2*k+7``) and ``250R`` is the fornix on the mirrored side (:data:`MIRRORED_FORNIX`)."""
    cmap: dict[int, int] = {}
    entries_in: dict[int, tuple[str, list[int] | None]] = {}
    k_rows: list[tuple] = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        f = [x.strip() for x in (next(csv.reader(io.StringIO(line))) if "," in line else line.split())]
        f = [x for x in f if x != ""]
        ours_txt = f[0].upper()
        if not ours_txt.lstrip("-").isdigit() and ours_txt != f"{FORNIX}R":
            continue  # header row
        expr = _k_expr(f[1]) if len(f) > 1 else None
        try:
            if expr is None:
                raise ValueError
            a = MIRRORED_FORNIX if ours_txt == f"{FORNIX}R" else int(ours_txt)
            rgba = [int(x) for x in f[3:7]] if len(f) >= 6 else None
            nm = f[2] if len(f) >= 3 else None
        except (ValueError, IndexError):
            raise HelmError(
                f"line {i}: expected 'our_code output_code [name R G B A]' (output code an integer or like k+1, "
                f"2k+7), got {line.strip()!r}",
                path=path,
            ) from None
        if expr[0] or a == MIRRORED_FORNIX:
            k_rows.append((a, expr[0], expr[1], nm, None if rgba is None else _check_rgba(a, rgba)))
            continue
        cmap[a] = expr[1]
        if nm is not None:
            entries_in[expr[1]] = (nm, rgba)
    t = _complete(name, cmap, entries_in)
    return LabelTable(t.name, t.entries, t.code_map, tuple(k_rows), notes) if k_rows or notes else t


def helm_table() -> LabelTable:
    """``--label-table helm``: the numbering of the published HELM maps, which depends on k (:data:`HELM_TABLE_TEXT`).

    Returns
    -------
    LabelTable
        k-dependent: use :meth:`LabelTable.for_k`.

    Example
    -------
    >>> t = helm_table().for_k(6)
    >>> [t.out_code(c) for c in (1, 6, 806, 807, 801, 802, FORNIX, MIRRORED_FORNIX)]
    [1, 6, 7, 12, 19, 24, 23, 11]
    """
    return _table_from_rows(HELM_TABLE_TEXT, "helm", notes=HELM_NOTES)


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
    return lut_tables(table, ks)[max(ks) if (ks := list(ks)) else 0]


def lut_tables(table: Any = "freesurfer", ks: Iterable[int] = DEFAULT_KS, extras: Iterable[Any] = ()) -> dict:
    """The colour table of every k: one for all when the table does not depend on k, else one per k.

    Parameters
    ----------
    table : str, path-like or LabelTable
        As :func:`load_label_table` takes.
    ks : iterable of int
        The k values of the run.
    extras : iterable of ExtraLabel
        ``--extra-labels`` (entries for both sides).

    Returns
    -------
    dict
        ``{k: LabelTable}`` for every k (the same object for every k of a k-independent table, with clusters
        1..max(ks)). HelmError when a k-dependent table collides with the clusters of some k.

    Example
    -------
    >>> t = lut_tables("helm", (4, 5))
    >>> t[4].entries[5][0], t[5].entries[5][0]
    ('R_hypothalamus_anterior_inferior', 'kmeans-cluster-5')
    """
    ks = [int(k) for k in ks] or [0]
    base = load_label_table(table)
    extras = list(extras)
    if not base.k_dependent:
        one = base.with_clusters(max(ks)).with_extras(extras)
        return {k: one for k in ks}
    return {k: base.for_k(k).with_clusters(k).with_extras(extras) for k in ks}


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
    # a k-dependent table (helm) renumbers the maps themselves: their codes are the output codes (those of the
    # largest k: one colour table per store is all OME-Zarr has, see lut_k{k}.txt for the others)
    back = {} if load_label_table(table).k_dependent else {out: ours for ours, out in t.code_map.items()}
    out: dict[int, tuple[str, tuple[int, ...]]] = {}
    for mapped in (False, True):  # a renumbered code's colour wins over an entry that merely has its number
        for code, (name, (r, g, b, a)) in t.entries.items():
            if (code in back) == mapped:
                out[back.get(code, code)] = (name, (r, g, b, 255 - a))
    out[0] = (out.get(0, ("Unknown", ()))[0], (0, 0, 0, 0))
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------------------
# users' own structures (--extra-labels)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtraLabel:
    """A structure of the user's in the manual file: its code on the hemisphere's (left) side, the code the mirror
    gives it on the other side (FreeSurfer pairs such as 18/54 are no offset; equal codes for a midline structure),
    a one-word name and an optional colour."""

    left: int
    right: int
    name: str
    rgba: tuple[int, int, int, int] | None = None

    def to_dict(self) -> dict:
        return {"left": self.left, "right": self.right, "name": self.name}


_SIDE_TOKENS = {"left": "L", "l": "L", "lh": "L", "right": "R", "r": "R", "rh": "R"}


def _extras_from_lut(p: Path) -> list[ExtraLabel]:
    """Pairs from a ColorLUT: entries whose names differ only by a side word (Left-X / Right-X) form a pair; a
    name without one is its own pair (one code on both sides)."""
    lut = LabelTable.from_colorlut(p)
    groups: dict[str, dict[str, tuple[int, str, Any]]] = {}
    for code, (n, rgba) in sorted(lut.entries.items()):
        if code == 0:
            continue
        toks = [t for t in re.split(r"[-_ ]+", n) if t]
        side = next((_SIDE_TOKENS[t.lower()] for t in toks if t.lower() in _SIDE_TOKENS), "")
        rest = "-".join(t for t in toks if t.lower() not in _SIDE_TOKENS) or n
        groups.setdefault(rest, {})[side or "B"] = (code, rest, rgba)
    out = []
    for rest, g in groups.items():
        if "B" in g:
            out.append(ExtraLabel(g["B"][0], g["B"][0], rest, g["B"][2]))
        if "L" in g or "R" in g:
            if not ("L" in g and "R" in g):
                raise HelmError(
                    f"--extra-labels: {rest!r} has only a {'left' if 'L' in g else 'right'} entry in this table",
                    path=p,
                    hint="give both sides (Left-NAME and Right-NAME), or one entry without a side word",
                )
            out.append(ExtraLabel(g["L"][0], g["R"][0], rest, g["L"][2]))
    return out


def parse_extra_labels(spec: Any) -> tuple[ExtraLabel, ...]:
    """``--extra-labels`` as pairs: ``"LEFT:RIGHT[:NAME],..."``, a list of those, or a ColorLUT file.

    Parameters
    ----------
    spec : str, list of str, path-like or None
        ``"18:54:amygdala,250:250:fornix"``; or a ColorLUT path (Left-X / Right-X entries pair up).

    Returns
    -------
    tuple of ExtraLabel
        Empty for nothing. HelmError for anything else (one line, naming the option).

    Example
    -------
    >>> [e.to_dict() for e in parse_extra_labels("1018:1054:Amygdala,2000:2000")]
    [{'left': 1018, 'right': 1054, 'name': 'Amygdala'}, {'left': 2000, 'right': 2000, 'name': 'extra-2000'}]
    """
    if not spec:
        return ()
    if isinstance(spec, ExtraLabel):
        return (spec,)
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    out: list[ExtraLabel] = []
    for it in items:
        if isinstance(it, ExtraLabel):
            out.append(it)
            continue
        if isinstance(it, Mapping):
            out.append(ExtraLabel(int(it["left"]), int(it["right"]), str(it.get("name") or f"extra-{it['left']}")))
            continue
        text = os.fspath(it) if isinstance(it, os.PathLike) else str(it)
        if ":" not in text and Path(text).is_file():
            out.extend(_extras_from_lut(Path(text)))
            continue
        for part in (x.strip() for x in text.split(",")):
            if not part:
                continue
            f = part.split(":")
            if len(f) not in (2, 3) or not all(x.strip().isdigit() for x in f[:2]) or (len(f) == 3 and not f[2]):
                raise HelmError(
                    f"--extra-labels expects LEFT:RIGHT[:NAME] (or a ColorLUT file), got {part!r}",
                    hint="e.g. --extra-labels 18:54:amygdala,250:250:fornix",
                )
            name = f[2].strip() if len(f) == 3 else f"extra-{int(f[0])}"
            if any(ch.isspace() for ch in name):
                raise HelmError(f"--extra-labels: name {name!r} must be one word", hint="e.g. 18:54:amygdala")
            out.append(ExtraLabel(int(f[0]), int(f[1]), name))
    return tuple(out)


def check_extra_labels(extras: Iterable[ExtraLabel], table: Any = "freesurfer", ks: Iterable[int] = DEFAULT_KS) -> None:
    """Refuse ``--extra-labels`` codes that collide with clusters (<= :data:`K_MAX`), hypothalamus codes, the label
    table's output codes for some k of the run, each other, or the uint16 range.

    Parameters
    ----------
    extras : iterable of ExtraLabel
        From :func:`parse_extra_labels`.
    table : str, path-like or LabelTable
        ``--label-table``.
    ks : iterable of int
        The k values of the run.

    Raises
    ------
    HelmError
        One line naming ``--extra-labels`` and the fix.

    Example
    -------
    >>> check_extra_labels(parse_extra_labels("18:54"))
    Traceback (most recent call last):
    ...
    helm_dask.errors.HelmError: --extra-labels: code 18 is a k-means cluster number (codes 1..20 are). ...
    """
    extras = list(extras)
    hint = "choose codes above 20 that are not 801-810 nor the label table's, e.g. FreeSurfer's + 1000"
    tables = lut_tables(table, ks)
    taken: dict[int, str] = {}
    for t in tables.values():
        for ours in set(HYPOTHALAMUS) | set(t.code_map):
            if ours != FORNIX:
                taken.setdefault(t.out_code(ours), "a hypothalamus code")
    lefts: dict[int, ExtraLabel] = {}
    rights: dict[int, ExtraLabel] = {}
    for e in extras:
        for code in (e.left, e.right):
            if code <= K_MAX:
                raise HelmError(
                    f"--extra-labels: code {code} is a k-means cluster number (codes 1..{K_MAX} are)", hint=hint
                )
            if code >= MIRRORED_FORNIX:
                raise HelmError(f"--extra-labels: code {code} is outside 21..{MIRRORED_FORNIX - 1}", hint=hint)
            if code in HYPOTHALAMUS or code in taken:
                raise HelmError(f"--extra-labels: code {code} is a hypothalamus code of the label table", hint=hint)
        if e.left == FORNIX and e.right != FORNIX:
            raise HelmError(
                f"--extra-labels: the fornix {FORNIX} keeps its code on the mirrored side, not {e.right}",
                hint=f"give it as {FORNIX}:{FORNIX}:fornix (--label-table decides the mirrored fornix's number)",
            )
        if e.left in lefts or e.right in rights or (e.left in rights and rights[e.left] is not e):
            raise HelmError(
                f"--extra-labels: code {e.left if e.left in lefts or e.left in rights else e.right} is given twice",
                hint="every structure needs its own left and right codes",
            )
        lefts[e.left] = rights[e.right] = e
    for e in extras:
        if e.right in lefts and lefts[e.right] is not e:
            raise HelmError(
                f"--extra-labels: {e.right} is both a right code and another structure's left code",
                hint="every structure needs its own left and right codes",
            )


def extra_right_to_left(extras: Iterable[ExtraLabel]) -> dict[int, int]:
    """What the manual file's right-side codes of ``--extra-labels`` become in the (left) hemisphere map.

    Parameters
    ----------
    extras : iterable of ExtraLabel

    Returns
    -------
    dict of int to int
        ``{right: left}`` for the pairs whose codes differ.
    """
    return {e.right: e.left for e in extras if e.right != e.left}


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


def _unique_counts_cell(block: np.ndarray) -> np.ndarray:
    """``np.unique(block, return_counts=True)`` in a one-element object array (a cell of the per-chunk grid)."""
    out = np.empty((1,) * block.ndim, dtype=object)
    out.flat[0] = np.unique(block, return_counts=True)
    return out


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
    # map_blocks, not to_delayed: a stored chunk's read fuses into its task (one task per chunk, not two; the
    # QC page's two label passes at 0.2 mm: 2.0 -> 1.3 s)
    parts = da.map_blocks(
        _unique_counts_cell,
        data,
        dtype=object,
        chunks=tuple((1,) * len(c) for c in data.chunks),
        meta=np.empty((0,) * data.ndim, dtype=object),
    ).compute()
    total: dict = {}
    for vals, cnts in parts.flat:
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
