"""Gene id kinds (Ensembl ids vs gene symbols) and symbol -> Ensembl maps.

Geneformer's vocabularies are keyed by Ensembl gene ids (``ENSG00000141510``); most files
name their genes by symbol (``TP53``). This module tells the two apart from the values
(:func:`classify_gene_ids`), refuses symbols against an Ensembl vocabulary up front
(:func:`check_gene_id_kinds`), reads a symbol -> Ensembl map such as Geneformer's
``gene_name_id_dict.pkl`` or a two-column CSV/TSV (:func:`read_gene_name_map`) and applies it
to a file's gene ids (:func:`map_gene_names`). Against a vocabulary keyed by symbols (CellFM's
release) the same map is read backwards, Ensembl id -> symbol (:func:`map_gene_ids_to_symbols`),
and :func:`load_gene_name_map` picks the direction from the vocabulary.

An Ensembl gene id is ``ENS`` + an optional species code + ``G`` + digits (human ``ENSG``,
mouse ``ENSMUSG``, zebrafish ``ENSDARG``...), optionally followed by a version suffix
(``ENSG00000000003.14``). The version is not part of the gene's identity and Geneformer's
vocabularies carry none, so ids are matched without it (:func:`strip_version`).
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from geneformer_peft.errors import DataError

logger = logging.getLogger(__name__)

__all__ = [
    "GeneIdKinds",
    "GeneNameMapping",
    "check_gene_id_kinds",
    "classify_gene_ids",
    "classify_vocabulary",
    "is_ensembl_id",
    "load_gene_name_map",
    "log_gene_name_mapping",
    "map_gene_ids_to_symbols",
    "map_gene_names",
    "map_to_vocabulary",
    "vocabulary_gene_ids",
    "read_gene_name_map",
    "strip_version",
    "validate_gene_name_map",
]

PathLike = str | Path

_HUMAN = re.compile(r"ENSG\d+(?:\.\d+)?")
_MOUSE = re.compile(r"ENSMUSG\d+(?:\.\d+)?")
_ENSEMBL = re.compile(r"ENS[A-Z]*G\d+(?:\.\d+)?")
_VERSION = re.compile(r"\.\d+$")

#: Ids shown per kind in :attr:`GeneIdKinds.examples` and in messages.
N_EXAMPLES = 5
#: Unmapped genes listed by :class:`GeneNameMapping` (highest total counts first).
N_TOP_UNMAPPED = 20
#: The mapping report is a warning (not info) above this share of counts in untranslated genes.
UNMAPPED_WARNING_FRACTION = 0.1
#: Data refused against an Ensembl vocabulary above this share of symbol-like ids.
MAX_SYMBOL_FRACTION = 0.5

GENE_NAME_MAP_HINT = ("pass --gene_name_id_dictionary PATH (gene_name_id_dictionary= in Python): a map of symbol -> "
                      "Ensembl id, e.g. Geneformer's gene_name_id_dict.pkl or a two-column CSV/TSV")


def is_ensembl_id(gene_id: str) -> bool:
    """Return whether ``gene_id`` is an Ensembl gene id of any species (version suffix allowed)."""
    return _ENSEMBL.fullmatch(str(gene_id)) is not None


def strip_version(gene_id: str) -> str:
    """``"ENSG00000000003.14"`` -> ``"ENSG00000000003"``; anything but a versioned Ensembl id is returned as is."""
    gene_id = str(gene_id)
    return _VERSION.sub("", gene_id) if is_ensembl_id(gene_id) else gene_id


@dataclass(frozen=True)
class GeneIdKinds:
    """How many of a set of gene ids are Ensembl ids, and of which species.

    Attributes
    ----------
    n_human, n_mouse, n_other_ensembl
        Ids matching ``ENSG\\d+``, ``ENSMUSG\\d+`` and any other ``ENS[A-Z]*G\\d+`` (each with
        an optional version suffix).
    n_symbol
        All other ids (gene symbols, spike-ins, made-up names).
    examples
        Up to :data:`N_EXAMPLES` ids of each kind present (``"human"``, ``"mouse"``,
        ``"other_ensembl"``, ``"symbol"``), in input order.
    """

    n_human: int
    n_mouse: int
    n_other_ensembl: int
    n_symbol: int
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def n_total(self) -> int:
        """Number of ids classified."""
        return self.n_human + self.n_mouse + self.n_other_ensembl + self.n_symbol

    @property
    def n_ensembl(self) -> int:
        """Ids that are Ensembl gene ids of any species."""
        return self.n_human + self.n_mouse + self.n_other_ensembl

    @property
    def symbol_fraction(self) -> float:
        """Share of the ids that are not Ensembl ids (0.0 for no ids)."""
        return self.n_symbol / self.n_total if self.n_total else 0.0

    @property
    def kind(self) -> str:
        """``"ensembl"`` (every id is one), ``"symbol"`` (none is) or ``"mixed"``; ``"symbol"`` for no ids."""
        if self.n_total and self.n_symbol == 0:
            return "ensembl"
        return "symbol" if self.n_ensembl == 0 else "mixed"


def classify_gene_ids(ids: Iterable[str]) -> GeneIdKinds:
    """Count the Ensembl ids (by species) and the other ids (symbols) among ``ids``.

    Parameters
    ----------
    ids
        Gene ids, e.g. a file's ``var_names`` or a token dictionary's keys (special tokens
        such as ``<pad>`` should be left out: they count as symbols).

    Returns
    -------
    GeneIdKinds
        The counts, the overall :attr:`~GeneIdKinds.kind` and a few examples of each kind.

    Examples
    --------
    >>> classify_gene_ids(["ENSG00000000003.14", "ENSMUSG00000000001", "TP53"]).kind
    'mixed'
    """
    counts = {"human": 0, "mouse": 0, "other_ensembl": 0, "symbol": 0}
    examples: dict[str, list[str]] = {key: [] for key in counts}
    for gene_id in ids:
        gene_id = str(gene_id)
        if _HUMAN.fullmatch(gene_id):
            key = "human"
        elif _MOUSE.fullmatch(gene_id):
            key = "mouse"
        elif _ENSEMBL.fullmatch(gene_id):
            key = "other_ensembl"
        else:
            key = "symbol"
        counts[key] += 1
        if len(examples[key]) < N_EXAMPLES:
            examples[key].append(gene_id)
    return GeneIdKinds(
        n_human=counts["human"], n_mouse=counts["mouse"], n_other_ensembl=counts["other_ensembl"],
        n_symbol=counts["symbol"], examples={key: tuple(value) for key, value in examples.items() if value},
    )


def classify_vocabulary(token_dictionary: Iterable[str]) -> GeneIdKinds:
    """:func:`classify_gene_ids` of a vocabulary's gene tokens (special tokens such as ``<pad>`` left out)."""
    from geneformer_peft.data.vocab import is_special_token

    return classify_gene_ids(t for t in token_dictionary if not is_special_token(str(t)))


def check_gene_id_kinds(
    gene_ids: Iterable[str],
    token_dictionary: Iterable[str],
    *,
    source_name: str,
    gene_id_field: str,
) -> GeneIdKinds:
    """Refuse gene symbols against an Ensembl vocabulary (and Ensembl ids against a vocabulary of
    symbols), before any counts are read.

    Parameters
    ----------
    gene_ids
        The file's gene ids.
    token_dictionary
        The vocabulary's tokens (a token dictionary's keys; special tokens are skipped).
    source_name
        The file, for the message.
    gene_id_field
        Where the ids were read, for the message (e.g. ``"var_names"``, ``"var['symbol']"``).

    Returns
    -------
    GeneIdKinds
        The kinds of ``gene_ids``.

    Raises
    ------
    DataError
        When most of the vocabulary's genes are Ensembl ids, more than
        :data:`MAX_SYMBOL_FRACTION` of the file's ids are not and most of those are not in the
        vocabulary (and the same the other way round): the message names the file, the field,
        example ids, the share of the other kind and the way forward.
    """
    gene_ids = [str(g) for g in gene_ids]
    tokens = [str(t) for t in token_dictionary]
    kinds = classify_gene_ids(gene_ids)
    vocabulary = classify_vocabulary(tokens)
    known = set(tokens)

    def mostly_unknown(symbols: bool) -> bool:
        """Whether most of the file's ids of one kind are absent from the vocabulary (a vocabulary
        mixing kinds that holds them is fine)."""
        ids = [strip_version(g) for g in gene_ids if is_ensembl_id(g) != symbols]
        return sum(g in known for g in ids) < MAX_SYMBOL_FRACTION * len(ids)

    if (vocabulary.n_ensembl > vocabulary.n_symbol and kinds.symbol_fraction > MAX_SYMBOL_FRACTION
            and mostly_unknown(symbols=True)):
        vocab_example = next(iter(vocabulary.examples.get("human", ()) or
                                  vocabulary.examples.get("mouse", ()) or
                                  vocabulary.examples.get("other_ensembl", ())))
        raise DataError(
            f"{source_name}: {100 * kinds.symbol_fraction:.1f}% of the {kinds.n_total} gene ids in {gene_id_field} "
            f"are not Ensembl ids, they look like gene symbols (e.g. {list(kinds.examples['symbol'])}), while the "
            f"token dictionary holds Ensembl ids (e.g. {vocab_example!r}); {GENE_NAME_MAP_HINT}, or pick a column "
            "of Ensembl ids with --gene_id_column"
        )
    if (vocabulary.n_symbol > vocabulary.n_ensembl and kinds.n_total and kinds.symbol_fraction < 1 - MAX_SYMBOL_FRACTION
            and mostly_unknown(symbols=False)):
        ensembl_examples = [g for kind in ("human", "mouse", "other_ensembl") for g in kinds.examples.get(kind, ())]
        raise DataError(
            f"{source_name}: {100 * (1 - kinds.symbol_fraction):.1f}% of the {kinds.n_total} gene ids in "
            f"{gene_id_field} are Ensembl ids (e.g. {ensembl_examples[:N_EXAMPLES]}), while the token dictionary "
            f"holds gene symbols (e.g. {list(vocabulary.examples.get('symbol', ()))[:3]}); pick a column of gene "
            "symbols with --gene_id_column (var_names: the index), or (--encoding cellfm) pass --gene_name_id_dictionary PATH, a map of "
            "symbol -> Ensembl id that is then read backwards"
        )
    return kinds


# ---------------------------------------------------------------------------------------------
# Symbol -> Ensembl maps
# ---------------------------------------------------------------------------------------------
def _check_entry(symbol: object, ensembl_id: object, where: str) -> tuple[str, str] | None:
    """The entry as stripped strings; ``None`` for an entry without a symbol (skipped, counted)."""
    if isinstance(symbol, (str, np.str_)) and not str(symbol).strip():
        return None  # BioMart exports list Ensembl ids without a symbol
    if not isinstance(symbol, (str, np.str_)):
        raise DataError(f"{where}: gene name {symbol!r} is not valid; expected a non-empty string (a gene symbol)")
    if not isinstance(ensembl_id, (str, np.str_)) or not is_ensembl_id(str(ensembl_id).strip()):
        raise DataError(
            f"{where}: gene {str(symbol)!r} maps to {ensembl_id!r}, which is not an Ensembl gene id; expected "
            "symbol -> Ensembl id such as 'ENSG00000141510' (is the map the other way round?)"
        )
    return str(symbol).strip(), str(ensembl_id).strip()


class _MapBuilder:
    """Collects symbol -> Ensembl entries. A symbol given two different ids (common in BioMart
    exports: Y_RNA, genes of the pseudo-autosomal regions) is ambiguous: it is left unmapped, as
    are entries without a symbol, and both are counted and logged rather than refusing the map."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.result: dict[str, str] = {}
        self.ambiguous: dict[str, set[str]] = {}
        self.n_without_symbol = 0

    def add(self, entry: tuple[str, str] | None) -> None:
        if entry is None:
            self.n_without_symbol += 1
            return
        symbol, ensembl_id = entry
        if symbol in self.ambiguous:
            self.ambiguous[symbol].add(ensembl_id)
            return
        previous = self.result.setdefault(symbol, ensembl_id)
        if previous != ensembl_id:
            self.ambiguous[symbol] = {previous, ensembl_id}
            del self.result[symbol]

    def finish(self, empty_message: str) -> dict[str, str]:
        if self.ambiguous:
            examples = {k: sorted(v) for k, v in list(self.ambiguous.items())[:3]}
            logger.warning("%s: %d symbols map to several Ensembl ids and are left unmapped (e.g. %s)", self.source,
                           len(self.ambiguous), examples)
        if self.n_without_symbol:
            logger.info("%s: %d entries without a symbol skipped", self.source, self.n_without_symbol)
        if not self.result:
            raise DataError(empty_message)
        return self.result


def validate_gene_name_map(raw: Mapping, source: str) -> dict[str, str]:
    """``raw`` as ``{symbol: Ensembl id}`` (stripped strings), or a :class:`DataError` naming ``source``, entry."""
    if not isinstance(raw, Mapping):
        raise DataError(f"{source}: the gene name map is a {type(raw).__name__}; expected a dict of symbol -> "
                        "Ensembl id")
    builder = _MapBuilder(source)
    for symbol, ensembl_id in raw.items():
        builder.add(_check_entry(symbol, ensembl_id, f"{source}: entry {symbol!r}"))
    return builder.finish(f"{source}: the gene name map is empty; expected symbol -> Ensembl id entries")


def _read_delimited(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not a UTF-8 text file ({error}); expected a two-column CSV/TSV of symbol, "
                        "Ensembl id (or a .pkl dict)") from error
    lines = text.splitlines()
    first = next((line for line in lines if line.strip()), "")
    delimiter = "\t" if first.count("\t") >= first.count(",") and "\t" in first else ","
    builder = _MapBuilder(str(path))
    first_line_seen = False
    for number, row in enumerate(csv.reader(lines, delimiter=delimiter), start=1):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise DataError(
                f"{path}: line {number} has {len(row)} fields ({row!r}); expected 2 (symbol, Ensembl id) "
                f"separated by {'a tab' if delimiter == chr(9) else 'a comma'}"
            )
        symbol, ensembl_id = (cell.strip() for cell in row)
        if not first_line_seen:
            first_line_seen = True
            if not is_ensembl_id(ensembl_id) and not is_ensembl_id(symbol):  # a header: "symbol,ensembl_id"
                logger.info("%s: line %d %r taken as the header", path, number, row)
                continue
        builder.add(_check_entry(symbol, ensembl_id, f"{path}: line {number}"))
    return builder.finish(f"{path}: the gene name map is empty; expected lines of symbol, Ensembl id")


def read_gene_name_map(path: PathLike) -> dict[str, str]:
    """Read a map of gene symbol -> Ensembl gene id.

    Parameters
    ----------
    path
        Geneformer's ``gene_name_id_dict.pkl`` (a pickled dict, read with
        :func:`~geneformer_peft.data.safe_pickle.load_plain_pickle`, so the file cannot run
        code) or a ``.pickle``; any other file is read as a two-column CSV or TSV
        (``symbol, ensembl_id``; the delimiter is detected from the first line, a first row
        in which neither field is an Ensembl id is taken as a header).

    Returns
    -------
    dict
        Symbol -> Ensembl id, as written (a version suffix is kept; :func:`map_gene_names`
        drops it).

    Raises
    ------
    DataError
        A missing or unreadable file, a row without exactly two fields, a value that is not an
        Ensembl id, or an empty map; the message names the file and the line or entry. A symbol
        given two different ids is left unmapped and an entry without a symbol skipped (both
        logged), as BioMart exports hold both.
    """
    from geneformer_peft.data.safe_pickle import load_plain_pickle

    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder; expected a gene name map (.pkl, or a CSV/TSV of symbol, Ensembl id)")
    if not path.is_file():
        raise DataError(f"{path}: gene name map file does not exist; expected a .pkl (Geneformer's "
                        "gene_name_id_dict.pkl) or a CSV/TSV of symbol, Ensembl id")
    if path.suffix.lower() in (".pkl", ".pickle"):
        return validate_gene_name_map(load_plain_pickle(path), str(path))
    return _read_delimited(path)


@dataclass(frozen=True)
class GeneNameMapping:
    """A file's gene ids translated to Ensembl ids by a symbol map.

    Attributes
    ----------
    ensembl_ids
        One id per column of the file: the map's Ensembl id for a mapped symbol, the column's own
        id for an Ensembl id (both without version suffix), the column's own id, unchanged,
        for an unmapped gene (it then matches a vocabulary only if that holds it).
    status
        Per column: ``"mapped"``, ``"ensembl"`` (given as an Ensembl id) or ``"unmapped"``.
    """

    ensembl_ids: np.ndarray
    status: np.ndarray
    #: the vocabulary's kind the ids were translated to: ``"ensembl"`` or ``"symbol"``
    #: (:func:`map_gene_ids_to_symbols`: ``ensembl_ids`` then holds symbols, ``status`` says
    #: ``"symbol"`` for a column already named by one, ``"ambiguous"`` for an Ensembl id that
    #: several of the vocabulary's symbols share)
    target: str = "ensembl"

    @property
    def vocabulary_ids(self) -> np.ndarray:
        """One id per column, in the vocabulary's kind (what the tokenizer matches)."""
        return self.ensembl_ids

    @property
    def n_mapped(self) -> int:
        """Columns whose symbol the map translated."""
        return int((self.status == "mapped").sum())

    @property
    def n_ensembl(self) -> int:
        """Columns already holding an Ensembl id."""
        return int((self.status == "ensembl").sum())

    @property
    def n_unmapped(self) -> int:
        """Columns neither given as Ensembl ids nor in the map."""
        return int((self.status == "unmapped").sum())

    def summary(self, gene_ids: np.ndarray, column_counts: np.ndarray, *, source: str) -> dict:
        """The mapping's figures for the tokenization report.

        Parameters
        ----------
        gene_ids
            The file's own gene ids (the names listed for unmapped genes).
        column_counts
            Total counts of each column over the tokenized cells.
        source
            Where the map came from (its path).

        Returns
        -------
        dict
            ``gene_name_id_dictionary``, ``n_genes_mapped``, ``n_genes_ensembl``,
            ``n_genes_unmapped``, ``n_ensembl_ids_from_several_genes``,
            ``mapped_count_fraction`` (share of the counts in mapped or Ensembl-id columns) and
            ``top_unmapped_genes`` (up to :data:`N_TOP_UNMAPPED` ``{"gene", "counts"}`` with the
            highest counts, counts > 0 only, ties by name).
        """
        column_counts = np.asarray(column_counts, dtype=np.float64)
        unmapped = np.flatnonzero(np.isin(self.status, ("unmapped", "ambiguous")) & (column_counts > 0))
        order = sorted(unmapped, key=lambda i: (-column_counts[i], str(gene_ids[i])))[:N_TOP_UNMAPPED]
        total = float(column_counts.sum())
        translated = ~np.isin(self.status, ("unmapped", "ambiguous"))
        _, per_id = np.unique(self.ensembl_ids[translated], return_counts=True)
        if self.target == "symbol":
            return {
                "gene_name_id_dictionary": source,
                "direction": "Ensembl id -> symbol",
                "n_genes_mapped": self.n_mapped,
                "n_genes_symbol": int((self.status == "symbol").sum()),
                "n_genes_unmapped": self.n_unmapped,
                "n_genes_ambiguous": int((self.status == "ambiguous").sum()),
                "n_symbols_from_several_genes": int((per_id > 1).sum()),
                "mapped_count_fraction": float(column_counts[translated].sum() / total) if total else 0.0,
                "top_unmapped_genes": [{"gene": str(gene_ids[i]), "counts": int(round(column_counts[i]))}
                                       for i in order],
            }
        return {
            "gene_name_id_dictionary": source,
            "n_genes_mapped": self.n_mapped,
            "n_genes_ensembl": self.n_ensembl,
            "n_genes_unmapped": self.n_unmapped,
            "n_ensembl_ids_from_several_genes": int((per_id > 1).sum()),
            "mapped_count_fraction": float(column_counts[translated].sum() / total) if total else 0.0,
            "top_unmapped_genes": [{"gene": str(gene_ids[i]), "counts": int(round(column_counts[i]))} for i in order],
        }


def map_gene_names(gene_ids: Iterable[str], gene_name_map: Mapping[str, str]) -> GeneNameMapping:
    """Translate gene symbols to Ensembl ids; Ensembl ids pass through.

    Parameters
    ----------
    gene_ids
        A file's gene ids (symbols, Ensembl ids or both).
    gene_name_map
        Symbol -> Ensembl id (see :func:`read_gene_name_map`); looked up exactly (case matters).

    Returns
    -------
    GeneNameMapping
        The translated ids and each column's status. Several columns may get the same
        Ensembl id (two symbols of one gene): the tokenizer sums them, as it sums any
        repeated gene id.
    """
    ids = [str(g) for g in gene_ids]
    translated, status = [], []
    for gene_id in ids:
        if is_ensembl_id(gene_id):
            translated.append(strip_version(gene_id))
            status.append("ensembl")
        elif gene_id in gene_name_map:
            translated.append(strip_version(gene_name_map[gene_id]))
            status.append("mapped")
        else:
            translated.append(gene_id)
            status.append("unmapped")
    return GeneNameMapping(ensembl_ids=np.array(translated, dtype=object).astype(str),
                           status=np.array(status, dtype=object).astype(str))


def map_gene_ids_to_symbols(gene_ids: Iterable[str], gene_name_map: Mapping[str, str],
                            vocabulary: Iterable[str]) -> GeneNameMapping:
    """Translate Ensembl ids to the symbols of a symbol-keyed vocabulary; symbols pass through.

    The symbol -> Ensembl map is read backwards. An Ensembl id that several symbols map to
    takes the one the vocabulary holds; when the vocabulary holds several of them the column
    is left untranslated (status ``"ambiguous"``, counted in the report) rather than guessed.

    Parameters
    ----------
    gene_ids
        A file's gene ids (Ensembl ids, with or without version, symbols, or both).
    gene_name_map
        Symbol -> Ensembl id (see :func:`read_gene_name_map`).
    vocabulary
        The vocabulary's tokens (its symbols).

    Returns
    -------
    GeneNameMapping
        ``target="symbol"``; ``ensembl_ids`` holds the symbols (the column's own id when
        untranslated) and ``status`` ``"mapped"``, ``"symbol"``, ``"ambiguous"`` or ``"unmapped"``.
    """
    known = set(map(str, vocabulary))
    symbols_of: dict[str, list[str]] = {}
    for symbol, ensembl_id in gene_name_map.items():
        symbols_of.setdefault(strip_version(str(ensembl_id)), []).append(str(symbol))
    translated, status = [], []
    for gene_id in (str(g) for g in gene_ids):
        if not is_ensembl_id(gene_id):
            translated.append(gene_id)
            status.append("symbol")
            continue
        candidates = symbols_of.get(strip_version(gene_id), [])
        in_vocabulary = [s for s in candidates if s in known]
        if len(in_vocabulary) == 1 or (not in_vocabulary and len(candidates) == 1):
            translated.append((in_vocabulary or candidates)[0])
            status.append("mapped")
        else:
            translated.append(gene_id)
            status.append("ambiguous" if len(in_vocabulary) > 1 else "unmapped")
    n_ambiguous = status.count("ambiguous")
    if n_ambiguous:
        logger.warning("%d Ensembl ids map to several symbols of the vocabulary and are left unmapped", n_ambiguous)
    return GeneNameMapping(ensembl_ids=np.array(translated, dtype=object).astype(str),
                           status=np.array(status, dtype=object).astype(str), target="symbol")


def load_gene_name_map(gene_name_id_dictionary: Mapping[str, str] | PathLike,
                       token_dictionary: Iterable[str]) -> tuple[dict[str, str], str, str]:
    """Read a symbol -> Ensembl map and the direction it is applied in for a vocabulary.

    Parameters
    ----------
    gene_name_id_dictionary
        The map (a dict) or its file (see :func:`read_gene_name_map`).
    token_dictionary
        The vocabulary's tokens.

    Returns
    -------
    (dict, str, str)
        The validated map, where it came from (its path, or ``"<dict>"``) and the vocabulary's
        kind: ``"ensembl"`` (symbols are translated to Ensembl ids) when most of its genes are
        Ensembl ids, else ``"symbol"`` (Ensembl ids are translated to symbols).
    """
    if isinstance(gene_name_id_dictionary, Mapping):
        source = "<dict>"
        name_map = validate_gene_name_map(gene_name_id_dictionary, "gene_name_id_dictionary")
    else:
        source = str(gene_name_id_dictionary)
        name_map = read_gene_name_map(gene_name_id_dictionary)
    vocabulary = classify_vocabulary(token_dictionary)
    return name_map, source, "ensembl" if vocabulary.n_ensembl > vocabulary.n_symbol else "symbol"


def map_to_vocabulary(gene_ids: Iterable[str], gene_name_map: Mapping[str, str], target: str,
                      token_dictionary: Iterable[str]) -> GeneNameMapping:
    """:func:`map_gene_names` (``target="ensembl"``) or :func:`map_gene_ids_to_symbols` (``"symbol"``)."""
    if target == "ensembl":
        return map_gene_names(gene_ids, gene_name_map)
    return map_gene_ids_to_symbols(gene_ids, gene_name_map, token_dictionary)


def vocabulary_gene_ids(cells, token_dictionary: Mapping[str, int], gene_name_map: Mapping[str, str] | None,
                        target: str = "ensembl") -> tuple[np.ndarray, GeneNameMapping | None]:
    """A file's gene ids as the vocabulary names them, for a tokenizer: without a map, the file's
    own ids after :func:`check_gene_id_kinds`; with one, translated by :func:`map_to_vocabulary`.

    Parameters
    ----------
    cells
        The open :class:`~geneformer_peft.data.cell_source.CellSource`.
    token_dictionary
        The vocabulary.
    gene_name_map, target
        The map of :func:`load_gene_name_map` and the vocabulary's kind, or ``None``.

    Returns
    -------
    (numpy.ndarray, GeneNameMapping or None)
        One id per column of the file, and the mapping (its figures) when a map was applied.
    """
    if gene_name_map is None:
        check_gene_id_kinds(cells.gene_ids, token_dictionary, source_name=cells.name,
                            gene_id_field=cells.gene_id_field)
        return cells.gene_ids, None
    mapping = map_to_vocabulary(cells.gene_ids, gene_name_map, target, token_dictionary)
    return mapping.vocabulary_ids, mapping


def log_gene_name_mapping(source: str, figures: Mapping) -> None:
    """Log a tokenization's mapping figures (:meth:`GeneNameMapping.summary`): a warning when the
    untranslated genes hold more than :data:`UNMAPPED_WARNING_FRACTION` of the counts."""
    top = ", ".join(f"{g['gene']} ({g['counts']})" for g in figures["top_unmapped_genes"][:5]) or "none"
    unmapped_share = 1.0 - figures["mapped_count_fraction"]
    level = logging.WARNING if unmapped_share > UNMAPPED_WARNING_FRACTION else logging.INFO
    if "n_genes_symbol" in figures:
        logger.log(level, "%s: gene name map %s (read backwards): %d Ensembl ids mapped to symbols, %d given as "
                   "symbols, %d unmapped and %d ambiguous holding %.1f%% of counts (highest: %s)", source,
                   figures["gene_name_id_dictionary"], figures["n_genes_mapped"], figures["n_genes_symbol"],
                   figures["n_genes_unmapped"], figures["n_genes_ambiguous"], 100 * unmapped_share, top)
        return
    logger.log(level, "%s: gene name map %s: %d genes mapped to Ensembl ids, %d given as Ensembl ids, %d unmapped "
               "holding %.1f%% of counts (highest: %s)", source, figures["gene_name_id_dictionary"],
               figures["n_genes_mapped"], figures["n_genes_ensembl"], figures["n_genes_unmapped"],
               100 * unmapped_share, top)
