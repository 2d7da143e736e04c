"""TurnMemory: a prompt that repeats a remembered answer gets that answer's own ids."""

from __future__ import annotations

from lmserve.engine.turn_memory import MIN_REUSED_TOKENS, TurnMemory

# A toy vocabulary: ids to bytes; the "canonical" tokenizer splits into characters.
PIECES = {1: b"<s>", 2: b"</s>", 10: b'{"', 11: b"name", 12: b'":', 13: b' "', 14: b"f", 15: b'"}',
          20: "é".encode()[:1], 21: "é".encode()[1:], 30: b"ab", 31: b"cd", 32: b"ef"}
EOG = 2


def piece(token: int) -> bytes:
    return PIECES[token] if token in PIECES else chr(token).encode()


def chars(text: str, special: bool) -> list[int]:
    """The canonical tokenizer: one id per character (ord), BOS first when special."""
    return ([1] if special else []) + [ord(c) for c in text]


def memory() -> TurnMemory:
    return TurnMemory(piece, [EOG], capacity=3)


def test_the_answer_s_own_ids_replace_its_retokenized_text() -> None:
    mem = memory()
    prompt = "Q: go\nA: "
    mem.remember(prompt, chars(prompt, True), [10, 11, 12, 13, 14, 15, EOG, 99])
    answer = '{"name": "f"}'
    text = prompt + answer + "\nQ: next"
    tokens = mem.tokenize(text, chars)
    assert tokens == chars(prompt, True) + [10, 11, 12, 13, 14, 15] + chars("\nQ: next", False)
    assert mem.hits == 1


def test_a_changed_answer_reuses_the_ids_up_to_the_change() -> None:
    mem = memory()
    prompt = "P "
    mem.remember(prompt, chars(prompt, True), [30, 31, 32, 30, 31, 32])
    found = mem.reuse(prompt + "abcdefabXX")
    assert found is not None and found.n_output == 4
    assert found.tokens == chars(prompt, True) + [30, 31, 32, 30]
    assert found.n_bytes == len((prompt + "abcdefab").encode())


def test_no_reuse_where_the_prompt_differs_or_too_little_matches() -> None:
    mem = memory()
    mem.remember("P ", chars("P ", True), [30, 31, 32, 30, 31])
    assert mem.reuse("Q abcdefabcd") is None  # another prompt
    assert mem.reuse("P ab") is None  # fewer than MIN_REUSED_TOKENS of the answer
    assert MIN_REUSED_TOKENS > 1
    assert memory().tokenize("P abc", chars) == chars("P abc", True)  # nothing remembered


def test_a_character_split_across_ids_is_never_cut() -> None:
    mem = memory()
    mem.remember("P ", chars("P ", True), [30, 31, 32, 30, 20, 21, 30])
    found = mem.reuse("P abcdefabé!")  # the answer goes on with "ab", the text with "!"
    assert found is not None and found.n_output == 6
    found = mem.reuse("P abcdefab" + "\u00e8")  # è shares é's first byte: not the second
    assert found is not None and found.n_output == 4
    assert found.n_bytes == len("P abcdefab")


def test_the_longest_match_wins_and_old_answers_are_forgotten() -> None:
    mem = memory()
    mem.remember("P ", chars("P ", True), [30, 31, 32, 30])
    mem.remember("P abcdefab", chars("P abcdefab", True), [31, 32, 30, 31])
    found = mem.reuse("P abcdefabcdefabcd!")
    assert found is not None and found.tokens == chars("P abcdefab", True) + [31, 32, 30, 31]
    for i in range(3):
        mem.remember(f"X{i} ", chars(f"X{i} ", True), [30, 31, 32, 30])
    assert len(mem) == 3 and mem.reuse("P abcdefabcdefabcd!") is None
