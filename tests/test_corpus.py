"""The built-in texts (lorc_gguf.corpus): deterministic, held-out domains disjoint from the
calibration text, calibration chunks in equal domain shares with chats in the model's template."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from lorc_gguf import calibration as cal
from lorc_gguf import corpus
from lorc_gguf.errors import LorcError
from lorc_gguf.format.read import open_gguf
from lorc_gguf.runtime.tokens import Tokenizer


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def test_domains_have_roles_and_text():
    assert set(corpus.CALIBRATION_DOMAINS) == {"docs", "code", "dialogue", "encyclopedia"}
    assert set(corpus.HELD_OUT_DOMAINS) == {"news", "drama"}
    for name, d in corpus.DOMAINS.items():
        for part in d.parts:
            # at least a few chunks of 2048 tokens at ~4 characters a token
            assert len(d.text(part)) > 50_000, (name, part)


def test_texts_are_deterministic():
    # the cached assembly and a fresh one give the same bytes (the caches are cleared between)
    first = {(n, p): _sha(d.text(p)) for n, d in corpus.DOMAINS.items() for p in d.parts}
    for f in (corpus._code, corpus._encyclopedia, corpus._news, corpus._drama, corpus.conversations,
              corpus.pydoc_text):
        f.cache_clear()
    again = {(n, p): _sha(d.text(p)) for n, d in corpus.DOMAINS.items() for p in d.parts}
    assert first == again


def test_held_out_domains_share_no_text_with_calibration():
    calibration = "\n".join(corpus.domain(n).text(corpus.CALIBRATION) for n in corpus.CALIBRATION_DOMAINS)
    for name in corpus.HELD_OUT_DOMAINS:
        text = corpus.domain(name).text(corpus.EVALUATION)
        # 40 probes of 80 characters each, spread over the held-out text
        probes = [text[i:i + 80] for i in range(0, len(text) - 80, len(text) // 40)][:40]
        assert not [p for p in probes if p in calibration], name
    docs_eval = corpus.domain("docs").text(corpus.EVALUATION)
    assert corpus.pydoc_text() == corpus.domain("docs").text(corpus.CALIBRATION) + docs_eval


def test_domain_roles_are_enforced():
    with pytest.raises(LorcError, match="not for calibration"):
        corpus.parse_domains("docs,news", corpus.CALIBRATION)
    with pytest.raises(LorcError, match="unknown text domain 'poetry'"):
        corpus.parse_domains("poetry", corpus.EVALUATION)
    with pytest.raises(LorcError, match="named twice"):
        corpus.parse_domains("docs,docs", corpus.CALIBRATION)
    with pytest.raises(LorcError, match="not for evaluation"):
        corpus.domain("code").text(corpus.EVALUATION)


def test_wiki_markup_becomes_prose():
    markup = ("{{Infobox person|name=X}}'''Ada Lovelace''' was an English [[mathematician]] and [[writer|author]] "
              "chiefly known for her work on the [[Analytical Engine]].<ref>Some citation</ref> She was the first "
              "to recognise that the machine had applications beyond pure calculation.\n"
              "== Early life ==\n* a list item that is dropped because lists are not prose at all\n"
              "[[File:Ada.jpg|thumb|A portrait]]\n{| class=wikitable\n| a table cell\n|}")
    text = corpus.wiki_to_text(markup)
    assert text == ("Ada Lovelace was an English mathematician and author chiefly known for her work on the "
                    "Analytical Engine. She was the first to recognise that the machine had applications beyond "
                    "pure calculation.")


def test_play_markdown_becomes_a_script():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n"
    assert corpus.play_to_text(md) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?"


def test_chats_render_in_the_model_template(smollm2_path):
    model = open_gguf(smollm2_path)
    render = cal.chat_renderer(model)
    text = render([{"role": "user", "content": "Hello?"}, {"role": "assistant", "content": "Hi."}])
    assert "<|im_start|>user\nHello?<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>" in text
    assert corpus.plain_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]) == \
        "User: a\nAssistant: b\n"


def test_calibration_chunks_share_domains_equally(smollm2_path):
    model = open_gguf(smollm2_path)
    chunks, meta = cal.calibration_chunks(model, n_tokens=8 * 512 + 100)
    assert chunks.shape == (8, 512)
    assert meta["domains"] == {"docs": 2, "code": 2, "dialogue": 2, "encyclopedia": 2}
    again, _ = cal.calibration_chunks(model, n_tokens=8 * 512 + 100)
    assert np.array_equal(chunks, again)
    tok = Tokenizer(smollm2_path)
    try:
        im_start = tok.tokenize("<|im_start|>", special=True)
        bos = tok.bos
    finally:
        tok.close()
    assert len(im_start) == 1
    assert (chunks[:, 0] == bos).all()
    # the dialogue chunks (rows 4, 5) hold the template's control tokens as single tokens, the
    # others none of them (past the BOS, which is <|im_start|> itself in SmolLM2)
    per_row = (chunks[:, 1:] == im_start[0]).sum(axis=1)
    assert (per_row[4:6] > 3).all() and (per_row[[0, 1, 2, 3, 6, 7]] == 0).all()
    # one domain alone
    only, meta = cal.calibration_chunks(model, n_tokens=2 * 512, domains=["code"])
    assert meta["domains"] == {"code": 2} and only.shape == (2, 512)


def test_a_missing_data_package_is_one_clear_error():
    with pytest.raises(LorcError, match=r"pip install --no-deps not-a-package==1\.0"):
        corpus.Package("not-a-package", "1.0").file("x.txt")
    with pytest.raises(LorcError, match=r"assembled from gensim==0\.0\.1, found 4\.4\.0"):
        corpus.Package("gensim", "0.0.1").file("x.txt")
