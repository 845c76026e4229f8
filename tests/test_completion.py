"""Completion accuracy: the metrics on known pairs, identifiers in every language the job parses, and next-line
tasks taken from real files."""

from __future__ import annotations

import random

import pytest

from job import syntax
from job.data import SourceFile
from job.evaluate import (
    Prompt,
    body_scores,
    choose_next_lines,
    completion_figures,
    edit_similarity,
    identifier_f1,
    levenshtein,
    normalized,
)
from job.model import train_tiny_tokenizer
from job.report import next_line_table

from .conftest import PROJECT


def test_exact_match_ignores_whitespace_only():
    assert normalized("    return  a +\tb  ") == normalized("return a + b") == "return a + b"
    assert normalized("return a+b") != normalized("return a + b")


@pytest.mark.parametrize("prediction, reference, expected", [
    ("kitten", "sitting", 1 - 3 / 7),  # two substitutions and an insertion
    ("return x", "return x", 1.0),
    ("  return x\n", "return x", 1.0),  # stripped first
    ("", "", 1.0),
    ("abc", "", 0.0),
    ("abcd", "abXd", 0.75),
])
def test_edit_similarity_is_one_minus_levenshtein_over_the_longer_length(prediction, reference, expected):
    assert edit_similarity(prediction, reference) == pytest.approx(expected)
    assert edit_similarity(reference, prediction) == pytest.approx(expected)


def test_identifier_f1_counts_repeats():
    assert identifier_f1(["a", "b", "b"], ["b", "b", "c"]) == pytest.approx(2 / 3)
    assert identifier_f1(["a"], ["a"]) == identifier_f1([], []) == 1.0
    assert identifier_f1(["a"], []) == identifier_f1([], ["a"]) == identifier_f1(["x"], ["y"]) == 0.0


IDENTIFIERS = {
    "python": ("def f(a):\n    return a.b + g(c) if a else None\n", ["f", "a", "a", "b", "g", "c", "a"]),
    "javascript": ("function f(a) { return a.b + g(c); }", ["f", "a", "a", "b", "g", "c"]),
    "typescript": ("function f(a: T): T { return a.b + g(c); }", ["f", "a", "T", "T", "a", "b", "g", "c"]),
    "tsx": ("function f(a: T): T { return a.b + g(c); }", ["f", "a", "T", "T", "a", "b", "g", "c"]),
    "go": ("func f(a T) T { return a.b + g(c) }", ["f", "a", "T", "T", "a", "b", "g", "c"]),
    "rust": ("fn f(a: T) -> T { a.b + g(c) }", ["f", "a", "T", "T", "a", "b", "g", "c"]),
    "java": ("class K { T f(T a) { return a.b + g(c); } }", ["K", "T", "f", "T", "a", "a", "b", "g", "c"]),
    "c": ("int f(int a) { return a.b + g(c); }", ["f", "a", "a", "b", "g", "c"]),
    "cpp": ("int f(int a) { return a.b + g(c); }", ["f", "a", "a", "b", "g", "c"]),
    "c_sharp": ("class K { int F(int a) { return a.B + G(c); } }", ["K", "F", "a", "a", "B", "G", "c"]),
    "bash": ('f() { echo $a; g "$b"; }', ["f", "echo", "a", "g", "b"]),
}


def test_identifiers_are_found_in_every_language_the_job_parses():
    assert sorted(IDENTIFIERS) == sorted(syntax.SUPPORTED_LANGUAGES)
    for language, (code, expected) in IDENTIFIERS.items():
        assert syntax.identifiers(language, code) == expected, language
    assert syntax.identifiers("text", "a b c") is None


def test_identifiers_of_unfinished_code_are_those_read_so_far():
    assert syntax.identifiers("python", "\n    total = count(items\n") == ["total", "count", "items"]
    assert syntax.identifiers("javascript", "{ return a.b(") == ["a", "b"]


def test_a_function_sample_is_scored_against_its_real_body():
    text = "def f(a):\n    return a + 1\n"
    prompt = Prompt(SourceFile("m.py", "", "python", text), "function", 0, 0, len("def f(a):"), len(text))
    perfect = body_scores({"completion": "\n    return a + 1\n"}, prompt)
    assert perfect == {"edit_sim": 1.0, "identifier_f1": 1.0}
    off = body_scores({"completion": "\n    return b + 1\n"}, prompt)
    assert off["edit_sim"] == pytest.approx(1 - 1 / len("return a + 1"), abs=5e-5) and off["identifier_f1"] == 0.0
    start = Prompt(SourceFile("m.py", "", "python", text), "file_start", 0, 0, 9, len(text))
    assert body_scores({"completion": "x"}, start) == {"edit_sim": None, "identifier_f1": None}


def real_files() -> list[SourceFile]:
    return [SourceFile(f"job/{name}", "", "python", (PROJECT / "job" / name).read_text())
            for name in ("cadence.py", "log.py", "rundir.py")]


def test_next_line_tasks_are_real_lines_with_the_file_above_them_and_the_same_every_time():
    files = real_files()
    tokenizer = train_tiny_tokenizer([f.text for f in files], 512)
    tasks = choose_next_lines(files, 12, seed=3, tokenizer=tokenizer, context_length=128, max_new_tokens=32)
    assert len(tasks) == 12 and {t.file.path for t in tasks} == {f.path for f in files}  # one file at a time
    for task in tasks:
        text = task.file.text
        assert text[task.line_start - 1] == "\n" and text[task.line_end] == "\n"  # a whole line, not the first
        assert len(task.target.strip()) >= 4 and "\n" not in task.target
        assert len(tokenizer.encode(task.target + "\n", add_special_tokens=False)) < 32
        assert task.context_start == 0 or text[task.context_start - 1] == "\n"
        # The prompt stops before the newline that ends the line above: the model writes it, then the line.
        assert task.prompt == text[task.context_start:task.line_start - 1] and task.prompt
        assert len(tokenizer.encode(task.prompt, add_special_tokens=False)) <= 128 - 32 - 1
    again = choose_next_lines(files, 12, seed=3, tokenizer=tokenizer, context_length=128, max_new_tokens=32)
    assert [(t.file.path, t.line_start) for t in again] == [(t.file.path, t.line_start) for t in tasks]
    other = choose_next_lines(files, 12, seed=4, tokenizer=tokenizer, context_length=128, max_new_tokens=32)
    assert [(t.file.path, t.line_start) for t in other] != [(t.file.path, t.line_start) for t in tasks]
    assert choose_next_lines(files, 0, 3, tokenizer, 128, 32) == []


def test_the_val_record_figures_are_means_with_their_task_counts():
    lines = [{"verdict": "exact", "edit_sim": 1.0}, {"verdict": "differs", "edit_sim": 0.5}]
    samples = [{"edit_sim": 0.25, "identifier_f1": 0.5}, {"edit_sim": 0.75, "identifier_f1": None},
               {"edit_sim": None, "identifier_f1": None}]
    assert completion_figures(samples, lines) == {
        "next_line_exact": 0.5, "next_line_edit_sim": 0.75, "next_line_tasks": 2, "body_edit_sim": 0.5,
        "body_tasks": 2, "body_identifier_f1": 0.5, "body_identifier_tasks": 1}
    assert completion_figures([], []) == {
        "next_line_exact": None, "next_line_edit_sim": None, "next_line_tasks": 0, "body_edit_sim": None,
        "body_tasks": 0, "body_identifier_f1": None, "body_identifier_tasks": 0}


def test_the_report_shows_each_next_line_at_the_first_and_the_latest_evaluation():
    def line(step, index, completion, verdict, edit_sim):
        return {"step": step, "index": index, "path": f"pkg/m{index}.py", "prompt": "def f(a, b):",
                "target": "    return a < b", "completion": completion, "verdict": verdict, "edit_sim": edit_sim}

    lines = [line(0, 0, "    pass", "differs", 0.25), line(0, 1, "x", "differs", 0.0),
             line(4, 0, "    return a<b", "differs", 0.875), line(8, 0, "    return a < b", "exact", 1.0),
             line(8, 1, "    return  a < b", "exact", 1.0)]
    heading, table = next_line_table(lines)
    assert heading == "Next lines (step 0 and step 8)"
    assert "exact (whitespace aside) 0 of 2 at step 0, 2 of 2 at step 8" in table
    rows = table.split("<tr>")[2:]
    assert len(rows) == 2 and "pkg/m0.py" in rows[0] and "pkg/m1.py" in rows[1]
    assert "    return a &lt; b" in rows[0] and "a < b" not in table and "0.88" not in table  # escaped; no step 4
    assert rows[0].index("    pass") < rows[0].index("edit sim 0.25") < rows[0].index("edit sim 1.00")
    assert next_line_table([]) == ("Next lines", "<p>No next lines.</p>")


def test_the_bit_parallel_edit_distance_agrees_with_the_table():
    def table(a: str, b: str) -> int:
        previous = list(range(len(b) + 1))
        for i, char in enumerate(a, 1):
            current = [i]
            for j, other in enumerate(b, 1):
                current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
            previous = current
        return previous[-1]

    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("ab c\n") for _ in range(rng.randint(0, 90)))
        b = "".join(rng.choice("abd c") for _ in range(rng.randint(0, 90)))
        assert levenshtein(a, b) == table(a, b), (a, b)
