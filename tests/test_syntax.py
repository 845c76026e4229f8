"""Syntax verdicts, function extraction and completion cuts, on known snippets and real files."""

import ast
from pathlib import Path

import pytest

from job import syntax
from job.data import SourceFile
from job.evaluate import Prompt, check_sample, choose_prompts, syntax_rate

from .conftest import PROJECT

# (parses, does not parse) for every supported language. The bad ones are near misses, not noise.
SNIPPETS = {
    "python": ("def add(a, b):\n    return a + b\n", "def add(a, b):\n    return (a + b\n"),
    "javascript": ("function add(a, b) {\n  return `${a}` + b;\n}\n", "function add(a, b) {\n  return a + ;\n}\n"),
    "typescript": ("function add(a: number, b: number): number {\n  return a + b;\n}\n",
                   "function add(a: number, b: number): number {\n  return a +\n"),
    "tsx": ("const App = () => <div className=\"x\">{1 + 2}</div>;\n",
            "const App = () => <div className=\"x\">{1 + </div>;\n"),
    "go": ("package main\n\nfunc Add(a, b int) int {\n\treturn a + b\n}\n",
           "package main\n\nfunc Add(a, b int) int {\n\treturn a +\n"),
    "rust": ("fn add(a: i32, b: i32) -> i32 {\n    a + b\n}\n", "fn add(a: i32, b: i32) -> i32 {\n    let x = ;\n}\n"),
    "java": ("class A {\n  int add(int a, int b) {\n    return a + b;\n  }\n}\n",
             "class A {\n  int add(int a, int b) {\n    return a + b\n  }\n}\n"),
    "c": ("int add(int a, int b) {\n  return a + b;\n}\n", "int add(int a, int b) {\n  return a + b;\n"),
    "cpp": ("template <typename T>\nT add(T a, T b) {\n  return a + b;\n}\n",
            "template <typename T>\nT add(T a, T b) {\n  return a + b;\n"),
    "c_sharp": ("class A {\n  int Add(int a, int b) {\n    return a + b;\n  }\n}\n",
                "class A {\n  int Add(int a, int b) {\n    return a + b;\n  \n}\n"),
    "bash": ("greet() {\n  echo \"hello $1\"\n}\n", "greet() {\n  if [ -n \"$1\" ]; then\n    echo hi\n}\n"),
}


def test_every_supported_language_has_a_checker_test():
    assert set(SNIPPETS) == set(syntax.SUPPORTED_LANGUAGES)


@pytest.mark.parametrize("language", sorted(SNIPPETS))
def test_syntax_verdicts(language):
    good, bad = SNIPPETS[language]
    assert syntax.parses(language, good) == (True, "")
    ok, why = syntax.parses(language, bad)
    assert ok is False and "line" in why


def test_python_errors_that_only_the_compiler_sees_are_caught():
    for source in ["return 1\n", "def f(a, a):\n    pass\n", "nonlocal x\n", "def f():\n    x = 1\n    global x\n"]:
        ast.parse(source)  # the parser alone accepts each of them
        assert syntax.parses("python", source)[0] is False, source


def test_a_language_without_a_checker_is_unsupported():
    assert syntax.parses("markdown", "# title\n")[0] is None
    assert syntax.functions("markdown", "# title\n") == []


def test_python_functions_of_a_real_file():
    """data.py of this project: every function's header ends with its docstring (or signature), its body follows."""
    text = (PROJECT / "job" / "data.py").read_text()
    found = syntax.functions("python", text)
    tree = ast.parse(text)
    defined = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    assert 10 <= len(found) <= len(defined)
    by_header = {text[c.start:c.header_end].split("(")[0].split()[-1]: c for c in found}
    pack = by_header["pack"]
    header, body = text[pack.start:pack.header_end], text[pack.header_end:pack.end]
    assert header.startswith("def pack(") and header.rstrip().endswith('"""')
    assert body.startswith("\n    lengths = ") and body.endswith(")\n")  # the header leaves its newline to the body
    for c in found:
        header, body = text[c.start:c.header_end], text[c.header_end:c.end]
        # The real body followed by the rest of the file: the cut falls exactly where the function ends.
        expected = None if not text[c.end:].strip() else len(body)
        assert syntax.completion_end("python", header, body + text[c.end:]) == expected


def test_python_cut_ignores_dedented_lines_inside_strings_and_brackets():
    header = "    def usage(self):\n"
    body = '        text = """\nNot the end of\nthe function\n"""\n        values = [\n1]\n        return text\n'
    assert syntax.completion_end("python", header, body + "    def next(self):\n") == len(body)
    assert syntax.completion_end("python", header, body) is None  # no dedent yet: the function goes on
    assert syntax.completion_end("python", header, body + "x") == len(body)  # a partial line shows its indent


BRACED = {
    "javascript": ("lib.js", "import fs from 'fs';\n\n// Reads a file, or {} when missing.\n"
                   "export function read(path) {\n"
                   "  if (!fs.existsSync(path)) { return '}'; }\n  return `${path}}`;\n}\n\n"
                   "class Cache {\n  get(key) {\n"
                   "    /* { */ return this.map[key];\n  }\n}\n"),
    "typescript": ("api.ts", "interface User { name: string }\n\nexport function greet(user: User): string {\n"
                   "  return `hi ${user.name}`;\n}\n"),
    "go": ("main.go", "package main\n\nimport \"fmt\"\n\n// Sum adds up xs.\nfunc Sum(xs []int) int {\n\ttotal := 0\n"
           "\tfor _, x := range xs {\n\t\ttotal += x\n\t}\n\treturn total\n}\n\n"
           "func main() {\n\tfmt.Println(Sum([]int{1, 2}), '}')\n}\n"),
    "rust": ("lib.rs", "/// Picks the longer of two strings.\npub fn longest<'a>(a: &'a str, b: &'a str) -> &'a str {\n"
             "    let brace = '{';\n    if a.len() >= b.len() { a } else { b }\n}\n"),
    "java": ("Shapes.java", "public class Shapes {\n    /** Area of a circle. */\n"
             "    public static double area(double r) {\n"
             "        String s = \"}\";\n        return Math.PI * r * r;\n    }\n}\n"),
    "c": ("util.c", "#include <string.h>\n\n/* Length without the trailing newline. */\n"
          "size_t trimmed(const char *s) {\n"
          "    size_t n = strlen(s);\n    if (n && s[n - 1] == '\\n') { n--; }\n    return n;\n}\n"),
    "cpp": ("vec.cpp", "#include <vector>\n\nnamespace geo {\nint total(const std::vector<int>& xs) {\n    int t = 0;\n"
            "    for (int x : xs) { t += x; }\n    return t;\n}\n}  // namespace geo\n"),
    "c_sharp": ("Calc.cs", "namespace Demo {\n  public class Calc {\n    // Adds.\n    public int Add(int a, int b) {\n"
                "      var s = $\"{a}\";\n      return a + b;\n    }\n  }\n}\n"),
    "bash": ("run.sh", "#!/bin/sh\n# Prints its arguments.\nshow() {\n  echo \"args: ${*}\" # }\n"
             "  return 0\n}\nshow a b\n"),
}


@pytest.mark.parametrize("language", sorted(BRACED))
def test_braced_functions_and_their_end(language):
    path, text = BRACED[language]
    found = syntax.functions(language, text)
    assert found, f"no function found in {path}"
    for c in found:
        header, body = text[c.start:c.header_end], text[c.header_end:c.end]
        assert header.endswith("{") and body.endswith("}")
        assert syntax.completion_end(language, header, body + "\n} trailing }") == len(body)
        assert syntax.completion_end(language, header, body[:-1]) is None
        # The original body put back in place parses: the check a sample goes through.
        prompt = Prompt(SourceFile(path, "", language, text), "function", 0, c.start, c.header_end, c.end)
        assert check_sample(prompt, body) == (True, "")
        assert check_sample(prompt, body[:-1])[0] is False
    first_header = text[found[0].start:found[0].header_end]
    if language in ("javascript", "go", "rust", "java", "c", "c_sharp", "bash"):
        # its doc comment comes along
        assert first_header.lstrip().startswith(("//", "///", "/*", "/**", "#")), first_header


@pytest.fixture(scope="module")
def tokenizer():
    from job.model import train_tiny_tokenizer

    texts = [p.read_text() for p in sorted((PROJECT / "job").glob("*.py"))]
    return train_tiny_tokenizer(texts, 600)


def sources() -> list[SourceFile]:
    files = [SourceFile(f"job/{p.name}", "", "python", p.read_text()) for p in sorted((PROJECT / "job").glob("*.py"))]
    files += [SourceFile(path, "", language, text) for language, (path, text) in BRACED.items()]
    files.append(SourceFile("NOTES.md", "", "markdown", "# Notes\n\nNothing to complete here.\n"))
    return files


def test_prompts_are_seeded_fit_their_budget_and_cover_files(tokenizer):
    files = sources()
    prompts = choose_prompts(files, 12, seed=3, tokenizer=tokenizer, context_length=256, max_new_tokens=64)
    again = choose_prompts(list(reversed(files)), 12, seed=3, tokenizer=tokenizer, context_length=256,
                           max_new_tokens=64)
    other = choose_prompts(files, 12, seed=4, tokenizer=tokenizer, context_length=256, max_new_tokens=64)
    key = [(p.file.path, p.header_start) for p in prompts]
    assert (len(prompts) == 12 and key == [(p.file.path, p.header_start) for p in again]
            and key != [(p.file.path, p.header_start) for p in other])
    assert len({p.file.path for p in prompts}) == 12  # one a file while files with functions last
    for p in prompts:
        assert p.kind == "function"
        body = p.file.text[p.prompt_end:p.end]
        assert len(tokenizer.encode(body, add_special_tokens=False)) <= 64
        model_input = p.file.text[p.context_start:p.prompt_end]
        assert len(tokenizer.encode(model_input, add_special_tokens=False)) <= 256 - 64 - 1
        assert model_input.endswith(p.header) and (p.context_start == 0 or p.file.text[p.context_start - 1] == "\n")


def test_files_without_functions_are_prompted_with_their_first_lines(tokenizer):
    notes = SourceFile("NOTES.md", "", "markdown", "".join(f"line {i}\n" for i in range(20)))
    script = SourceFile("setup.py", "", "python", "import os\n\nNAME = 'x'\nprint(NAME)\n")
    prompts = choose_prompts([notes, script], 5, seed=0, tokenizer=tokenizer, context_length=64, max_new_tokens=16)
    assert sorted((p.file.path, p.kind) for p in prompts) == [("NOTES.md", "file_start"), ("setup.py", "file_start")]
    md = next(p for p in prompts if p.file.path == "NOTES.md")
    assert md.header == "".join(f"line {i}\n" for i in range(8)).rstrip("\n")  # the last newline is the model's
    assert check_sample(md, "\nline 8\n")[0] is None
    py = next(p for p in prompts if p.file.path == "setup.py")
    assert check_sample(py, "\nx = (\n")[0] is False and check_sample(py, "\nx = 1\n")[0] is True
    assert choose_prompts([notes], 0, seed=0, tokenizer=tokenizer, context_length=64, max_new_tokens=16) == []


def test_syntax_rate_leaves_out_unsupported_samples():
    records = [{"verdict": "parses"}, {"verdict": "syntax_error"}, {"verdict": "unsupported"}, {"verdict": "parses"},
               {"verdict": "unfinished"}]
    assert syntax_rate(records) == (pytest.approx(2 / 4), 4)
    assert syntax_rate([{"verdict": "unsupported"}]) == (None, 0)


def test_the_readme_lists_the_supported_languages():
    readme = Path(PROJECT / "README.md").read_text()
    for language in syntax.SUPPORTED_LANGUAGES:
        assert f"`{language}`" in readme, language


def test_lines_split_only_at_newlines():
    # Generated text can hold form feeds and other characters str.splitlines treats as line ends.
    body = "    x = '\x0c'\n    y = 1\x1c\n"
    assert syntax.completion_end("python", "def f():\n", body + "z = 2\n") == len(body)
    text = "a = 1\x0c\ndef f():\n    '''doc\x0bstring'''\n    return 1\n"
    (c,) = syntax.functions("python", text)
    assert (text[c.start:c.header_end] == "def f():\n    '''doc\x0bstring'''"
            and text[c.header_end:c.end] == "\n    return 1\n")
