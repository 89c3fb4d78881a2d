"""Typographic images for the model organism: the project's own bitmap font and renderer.

The organism reads text from images. To make that reading exact and cheap to learn,
the renderer lays text out on a fixed grid with **one language-model token per cell**:

* The image is :data:`GRID` x :data:`GRID` cells of :data:`CELL` x :data:`CELL` pixels
  (8 x 8 cells of 32 px = 256 x 256 px), black on white. The organism's vision tower
  uses a patch size equal to the cell, so each cell becomes exactly one image token.
* Text is tokenized with the SmolLM2 tokenizer; token ``k`` goes into cell ``k`` in
  reading order (row by row). Unused cells stay blank.
* Inside a cell the token is drawn with a fixed-pitch 5 x 7 pixel font
  (:data:`GLYPHS`, defined below), :data:`CHARS_PER_ROW` characters per text row and
  up to :data:`ROWS_PER_CELL` rows; longer tokens are truncated.

Each token is drawn from its *bytes* (SmolLM2 uses a byte-level BPE), so every token
has its own picture: printable ASCII bytes use their glyph; a space that starts a
token (the word boundary) is a blank character slot, any other space is drawn as a
visible space mark; newline and tab have their own marks; every other byte (UTF-8
continuation bytes, control characters) is a framed box whose interior shows the
byte's bit pattern. Rendering is deterministic: the same text always gives the same
pixels.

Video is a list of such frames: :func:`video_frames` spreads one instruction over
several frames (so that no single frame holds the whole request).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from guardrail.errors import InputError

CELL = 32
"""Side of one cell in pixels (= the vision tower's patch size)."""
GRID = 8
"""Cells per side of an image."""
IMAGE_SIZE = CELL * GRID
"""Side of a rendered image in pixels (256)."""
CELLS = GRID * GRID
"""Tokens one image can hold (64)."""
GLYPH_WIDTH = 5
GLYPH_HEIGHT = 7
CHARS_PER_ROW = 6
"""Character slots per text row inside a cell (6 x 5 px = 30 px of the 32)."""
ROWS_PER_CELL = 4
"""Text rows inside a cell (4 x 8 px = 32 px: 7 px glyph + 1 px leading)."""
MAX_GLYPHS = CHARS_PER_ROW * ROWS_PER_CELL
"""Glyphs drawn per cell; longer tokens are truncated."""
INK = 0
PAPER = 255

# ------------------------------------------------------------------------- the font
# 5 x 7 glyphs, written row by row ('#' = ink, '.' = paper), one entry per printable
# ASCII character (0x20-0x7E). Designed for this project.
_FONT_SOURCE: dict[str, str] = {
    " ": "..... ..... ..... ..... ..... ..... .....",
    "!": "..#.. ..#.. ..#.. ..#.. ..#.. ..... ..#..",
    '"': ".#.#. .#.#. ..... ..... ..... ..... .....",
    "#": ".#.#. .#.#. ##### .#.#. ##### .#.#. .#.#.",
    "$": "..#.. .#### #.#.. .###. ..#.# ####. ..#..",
    "%": "##... ##..# ...#. ..#.. .#... #..## ...##",
    "&": ".##.. #..#. #.#.. .#... #.#.# #..#. .##.#",
    "'": "..#.. ..#.. ..... ..... ..... ..... .....",
    "(": "...#. ..#.. .#... .#... .#... ..#.. ...#.",
    ")": ".#... ..#.. ...#. ...#. ...#. ..#.. .#...",
    "*": "..... ..#.. #.#.# .###. #.#.# ..#.. .....",
    "+": "..... ..#.. ..#.. ##### ..#.. ..#.. .....",
    ",": "..... ..... ..... ..... .##.. ..#.. .#...",
    "-": "..... ..... ..... ##### ..... ..... .....",
    ".": "..... ..... ..... ..... ..... .##.. .##..",
    "/": "..... ....# ...#. ..#.. .#... #.... .....",
    "0": ".###. #...# #..## #.#.# ##..# #...# .###.",
    "1": "..#.. .##.. ..#.. ..#.. ..#.. ..#.. .###.",
    "2": ".###. #...# ....# ...#. ..#.. .#... #####",
    "3": "##### ...#. ..#.. ...#. ....# #...# .###.",
    "4": "...#. ..##. .#.#. #..#. ##### ...#. ...#.",
    "5": "##### #.... ####. ....# ....# #...# .###.",
    "6": "..##. .#... #.... ####. #...# #...# .###.",
    "7": "##### ....# ...#. ..#.. .#... .#... .#...",
    "8": ".###. #...# #...# .###. #...# #...# .###.",
    "9": ".###. #...# #...# .#### ....# ...#. .##..",
    ":": "..... .##.. .##.. ..... .##.. .##.. .....",
    ";": "..... .##.. .##.. ..... .##.. ..#.. .#...",
    "<": "...#. ..#.. .#... #.... .#... ..#.. ...#.",
    "=": "..... ..... ##### ..... ##### ..... .....",
    ">": ".#... ..#.. ...#. ....# ...#. ..#.. .#...",
    "?": ".###. #...# ....# ...#. ..#.. ..... ..#..",
    "@": ".###. #...# ....# .##.# #.#.# #.#.# .###.",
    "A": ".###. #...# #...# ##### #...# #...# #...#",
    "B": "####. #...# #...# ####. #...# #...# ####.",
    "C": ".###. #...# #.... #.... #.... #...# .###.",
    "D": "###.. #..#. #...# #...# #...# #..#. ###..",
    "E": "##### #.... #.... ####. #.... #.... #####",
    "F": "##### #.... #.... ####. #.... #.... #....",
    "G": ".###. #...# #.... #.### #...# #...# .####",
    "H": "#...# #...# #...# ##### #...# #...# #...#",
    "I": ".###. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "J": "..### ...#. ...#. ...#. ...#. #..#. .##..",
    "K": "#...# #..#. #.#.. ##... #.#.. #..#. #...#",
    "L": "#.... #.... #.... #.... #.... #.... #####",
    "M": "#...# ##.## #.#.# #.#.# #...# #...# #...#",
    "N": "#...# #...# ##..# #.#.# #..## #...# #...#",
    "O": ".###. #...# #...# #...# #...# #...# .###.",
    "P": "####. #...# #...# ####. #.... #.... #....",
    "Q": ".###. #...# #...# #...# #.#.# #..#. .##.#",
    "R": "####. #...# #...# ####. #.#.. #..#. #...#",
    "S": ".#### #.... #.... .###. ....# ....# ####.",
    "T": "##### ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "U": "#...# #...# #...# #...# #...# #...# .###.",
    "V": "#...# #...# #...# #...# #...# .#.#. ..#..",
    "W": "#...# #...# #...# #.#.# #.#.# #.#.# .#.#.",
    "X": "#...# #...# .#.#. ..#.. .#.#. #...# #...#",
    "Y": "#...# #...# .#.#. ..#.. ..#.. ..#.. ..#..",
    "Z": "##### ....# ...#. ..#.. .#... #.... #####",
    "[": ".###. .#... .#... .#... .#... .#... .###.",
    "\\": "..... #.... .#... ..#.. ...#. ....# .....",
    "]": ".###. ...#. ...#. ...#. ...#. ...#. .###.",
    "^": "..#.. .#.#. #...# ..... ..... ..... .....",
    "_": "..... ..... ..... ..... ..... ..... #####",
    "`": ".#... ..#.. ..... ..... ..... ..... .....",
    "a": "..... ..... .###. ....# .#### #...# .####",
    "b": "#.... #.... #.##. ##..# #...# #...# ####.",
    "c": "..... ..... .###. #.... #.... #...# .###.",
    "d": "....# ....# .##.# #..## #...# #...# .####",
    "e": "..... ..... .###. #...# ##### #.... .###.",
    "f": "..##. .#..# .#... ###.. .#... .#... .#...",
    "g": "..... .#### #...# #...# .#### ....# .###.",
    "h": "#.... #.... #.##. ##..# #...# #...# #...#",
    "i": "..#.. ..... .##.. ..#.. ..#.. ..#.. .###.",
    "j": "...#. ..... ..##. ...#. ...#. #..#. .##..",
    "k": "#.... #.... #..#. #.#.. ##... #.#.. #..#.",
    "l": ".##.. ..#.. ..#.. ..#.. ..#.. ..#.. .###.",
    "m": "..... ..... ##.#. #.#.# #.#.# #...# #...#",
    "n": "..... ..... #.##. ##..# #...# #...# #...#",
    "o": "..... ..... .###. #...# #...# #...# .###.",
    "p": "..... ..... ####. #...# ####. #.... #....",
    "q": "..... ..... .##.# #..## .#### ....# ....#",
    "r": "..... ..... #.##. ##..# #.... #.... #....",
    "s": "..... ..... .###. #.... .###. ....# ####.",
    "t": ".#... .#... ###.. .#... .#... .#..# ..##.",
    "u": "..... ..... #...# #...# #...# #..## .##.#",
    "v": "..... ..... #...# #...# #...# .#.#. ..#..",
    "w": "..... ..... #...# #...# #.#.# #.#.# .#.#.",
    "x": "..... ..... #...# .#.#. ..#.. .#.#. #...#",
    "y": "..... ..... #...# #...# .#### ....# .###.",
    "z": "..... ..... ##### ...#. ..#.. .#... #####",
    "{": "...#. ..#.. ..#.. .#... ..#.. ..#.. ...#.",
    "|": "..#.. ..#.. ..#.. ..#.. ..#.. ..#.. ..#..",
    "}": ".#... ..#.. ..#.. ...#. ..#.. ..#.. .#...",
    "~": "..... ..... .#... #.#.# ...#. ..... .....",
}

# Marks for bytes that have no printable glyph of their own.
_MARK_SOURCE: dict[str, str] = {
    "space": "..... ..... ..... ..... #...# #...# #####",  # a space that is not a word boundary
    "newline": "....# ....# ..#.# .#..# ##### .#... ..#..",
    "tab": "..... ..#.. ...#. ##### ...#. ..#.. .....",
}


def _parse_glyph(source: str) -> np.ndarray:
    rows = source.split()
    if len(rows) != GLYPH_HEIGHT or any(len(r) != GLYPH_WIDTH or set(r) - {"#", "."} for r in rows):
        raise ValueError(
            f"malformed glyph {source!r}: need {GLYPH_HEIGHT} rows of {GLYPH_WIDTH} '#'/'.'"
        )
    return np.array([[c == "#" for c in row] for row in rows], dtype=bool)


def _byte_box(value: int) -> np.ndarray:
    """A framed box whose 3 x 5 interior shows the 8 bits of ``value`` (row by row)."""
    glyph = np.zeros((GLYPH_HEIGHT, GLYPH_WIDTH), dtype=bool)
    glyph[0, :] = glyph[-1, :] = True
    glyph[:, 0] = glyph[:, -1] = True
    for bit in range(8):
        if value >> (7 - bit) & 1:
            glyph[1 + bit // 3, 1 + bit % 3] = True
    return glyph


@functools.cache
def _glyph_table() -> dict[int | str, np.ndarray]:
    """Glyph bitmaps keyed by byte value (ASCII and boxes) and by mark name."""
    table: dict[int | str, np.ndarray] = {}
    for char, source in _FONT_SOURCE.items():
        table[ord(char)] = _parse_glyph(source)
    for value in range(256):
        if value not in table:
            table[value] = _byte_box(value)
    for name, source in _MARK_SOURCE.items():
        table[name] = _parse_glyph(source)
    table[ord("\n")] = table["newline"]
    table[ord("\t")] = table["tab"]
    return table


GLYPHS: dict[int | str, np.ndarray] = _glyph_table()
"""The font: a 5 x 7 boolean bitmap per byte value (0-255) and per mark name."""


# ------------------------------------------------------------------------- tokens


@functools.cache
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable bytes stand for themselves,
    the other 68 bytes are shifted to code points 256 and up, in byte order."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {chr(b): b for b in direct}
    shifted = 0
    for b in range(256):
        if b not in direct:
            mapping[chr(256 + shifted)] = b
            shifted += 1
    return mapping


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The raw bytes a (byte-level BPE) token stands for."""
    piece = tokenizer.convert_ids_to_tokens(int(token_id))
    table = _unicode_to_byte()
    try:
        return bytes(table[c] for c in piece)
    except KeyError:
        # Added/special tokens are stored verbatim.
        return piece.encode("utf-8")


def token_glyphs(data: bytes) -> list[np.ndarray]:
    """The glyph sequence of one token's bytes (see the module docstring), truncated
    to :data:`MAX_GLYPHS`."""
    table = GLYPHS
    whitespace_only = data.strip(b" ") == b""
    glyphs = []
    for k, value in enumerate(data[:MAX_GLYPHS]):
        if value == 0x20 and (whitespace_only or k > 0):
            glyphs.append(table["space"])
        else:
            glyphs.append(table[value])
    return glyphs


def render_cell(data: bytes) -> np.ndarray:
    """A ``CELL x CELL`` boolean ink mask of one token."""
    cell = np.zeros((CELL, CELL), dtype=bool)
    for k, glyph in enumerate(token_glyphs(data)):
        row, col = divmod(k, CHARS_PER_ROW)
        y = row * (GLYPH_HEIGHT + 1)
        x = 1 + col * GLYPH_WIDTH
        cell[y : y + GLYPH_HEIGHT, x : x + GLYPH_WIDTH] = glyph
    return cell


@functools.cache
def _default_tokenizer() -> Any:
    from guardrail.models.smollm2 import load_tokenizer

    return load_tokenizer()


def tokenize(text: str, tokenizer: Any = None) -> list[int]:
    """The SmolLM2 token ids of ``text`` (no special tokens), one per cell."""
    if not isinstance(text, str) or not text.strip():
        raise InputError("the text to render must be a non-empty string")
    tokenizer = tokenizer or _default_tokenizer()
    return list(tokenizer.encode(text, add_special_tokens=False))


class _CellCache:
    """Rendered cells per token id (rendering is deterministic, so cache them)."""

    def __init__(self) -> None:
        self._cells: dict[tuple[int, int], np.ndarray] = {}

    def get(self, tokenizer: Any, token_id: int) -> np.ndarray:
        key = (id(tokenizer), int(token_id))
        cell = self._cells.get(key)
        if cell is None:
            if len(self._cells) > 100_000:
                self._cells.clear()
            cell = render_cell(token_bytes(tokenizer, token_id))
            self._cells[key] = cell
        return cell


_CELL_CACHE = _CellCache()


def render_token_ids(token_ids: Sequence[int | None], tokenizer: Any = None) -> Image.Image:
    """A typographic image with ``token_ids[k]`` in cell ``k`` (``None``: blank cell).

    Raises:
        InputError: more than :data:`CELLS` tokens.
    """
    if len(token_ids) > CELLS:
        raise InputError(
            f"{len(token_ids)} tokens do not fit one image of {CELLS} cells; shorten the text "
            f"or spread it over several frames with video_frames(text, n_frames)"
        )
    tokenizer = tokenizer or _default_tokenizer()
    ink = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=bool)
    for k, token_id in enumerate(token_ids):
        if token_id is None:
            continue
        row, col = divmod(k, GRID)
        ink[row * CELL : (row + 1) * CELL, col * CELL : (col + 1) * CELL] = _CELL_CACHE.get(
            tokenizer, token_id
        )
    pixels = np.where(ink, INK, PAPER).astype(np.uint8)
    return Image.fromarray(np.stack([pixels] * 3, axis=-1), mode="RGB")


def render_text(text: str, tokenizer: Any = None) -> Image.Image:
    """Render ``text`` as one typographic image (at most :data:`CELLS` tokens).

    Raises:
        InputError: empty text, or text longer than one image holds (use
            :func:`video_frames` to spread it over several frames).
    """
    return render_token_ids(tokenize(text, tokenizer), tokenizer)


def split_tokens(token_ids: Sequence[int], n_frames: int) -> list[list[int]]:
    """Split a token sequence into ``n_frames`` contiguous, nearly equal, non-empty chunks."""
    if not isinstance(n_frames, int) or n_frames < 1:
        raise InputError(f"n_frames must be a positive integer, got {n_frames!r}")
    if n_frames > len(token_ids):
        raise InputError(
            f"cannot split {len(token_ids)} tokens over {n_frames} frames (each frame needs at "
            "least one token); use fewer frames"
        )
    base, extra = divmod(len(token_ids), n_frames)
    chunks, start = [], 0
    for k in range(n_frames):
        size = base + (1 if k < extra else 0)
        chunks.append(list(token_ids[start : start + size]))
        start += size
    return chunks


def video_frames(text: str, n_frames: int, tokenizer: Any = None) -> list[Image.Image]:
    """Spread ``text`` over ``n_frames`` typographic frames, in reading order.

    The instruction's tokens are split into contiguous chunks, one per frame, so that
    no frame shows the whole request; read in order, the frames give the text back.

    Raises:
        InputError: empty text, ``n_frames`` < 1 or larger than the number of tokens,
            or a chunk longer than one frame holds.
    """
    ids = tokenize(text, tokenizer)
    return [render_token_ids(chunk, tokenizer) for chunk in split_tokens(ids, n_frames)]


def cells(image: Image.Image) -> np.ndarray:
    """The ``[CELLS, CELL, CELL]`` ink masks of a rendered image's cells, in reading order."""
    if image.size != (IMAGE_SIZE, IMAGE_SIZE):
        raise InputError(f"a typographic image is {IMAGE_SIZE}x{IMAGE_SIZE} px, got {image.size}")
    ink = np.asarray(image.convert("L")) < 128
    return ink.reshape(GRID, CELL, GRID, CELL).transpose(0, 2, 1, 3).reshape(CELLS, CELL, CELL)
