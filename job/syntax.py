"""Code structure without a model: where functions begin and end, where a completion ends, and whether code parses."""

from __future__ import annotations

import ast
import functools
import importlib
import io
import itertools
import keyword
import re
import tokenize
import warnings
from dataclasses import dataclass

# Languages whose syntax is checked: Python with its own parser, the rest with tree-sitter grammars that the
# official wheels ship compiled (nothing is downloaded at run time).
TREE_SITTER_GRAMMARS = {
    "javascript": ("tree_sitter_javascript", "language"),
    "typescript": ("tree_sitter_typescript", "language_typescript"),
    "tsx": ("tree_sitter_typescript", "language_tsx"),
    "go": ("tree_sitter_go", "language"),
    "rust": ("tree_sitter_rust", "language"),
    "java": ("tree_sitter_java", "language"),
    "c": ("tree_sitter_c", "language"),
    "cpp": ("tree_sitter_cpp", "language"),
    "c_sharp": ("tree_sitter_c_sharp", "language"),
    "bash": ("tree_sitter_bash", "language"),
}
SUPPORTED_LANGUAGES = ("python", *TREE_SITTER_GRAMMARS)
_RUST_CHAR = re.compile(r"'(?:\\(?:u\{[0-9a-fA-F]+\}|x[0-9a-fA-F]{2}|.)|[^\\'\n])'")

# Tree-sitter node types that are a function with a braced body, per grammar.
FUNCTION_NODES = {
    "javascript": {"function_declaration", "generator_function_declaration", "method_definition"},
    "typescript": {"function_declaration", "generator_function_declaration", "method_definition"},
    "tsx": {"function_declaration", "generator_function_declaration", "method_definition"},
    "go": {"function_declaration", "method_declaration"},
    "rust": {"function_item"},
    "java": {"method_declaration", "constructor_declaration"},
    "c": {"function_definition"},
    "cpp": {"function_definition"},
    "c_sharp": {"method_declaration", "constructor_declaration", "local_function_statement"},
    "bash": {"function_definition"},
}


@dataclass(frozen=True)
class Construct:
    """A function in a file: text[start:header_end] is its header (the prompt), text[header_end:end] its body."""

    start: int
    header_end: int
    end: int


def parses(language: str, source: str) -> tuple[bool | None, str]:
    """(True, "") when source parses, (False, why) when it does not, (None, why) for a language without a checker."""
    if language == "python":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escapes and the like are warnings, not syntax errors
                tree = ast.parse(source)
                # compile() also runs the checks the parser leaves out: return outside a function, misplaced
                # nonlocal, duplicate arguments, and so on. It compiles; nothing is executed.
                compile(tree, "<sample>", "exec", dont_inherit=True)
        except RecursionError:  # nesting deeper than the compiler's own limit (a long chain of operands)
            return False, "nested too deeply for Python's compiler"
        except (SyntaxError, ValueError) as err:  # ValueError: a NUL byte in the source
            line = getattr(err, "lineno", None)
            return False, f"{getattr(err, 'msg', str(err))}" + (f" (line {line})" if line else "")
        return True, ""
    parser = _parser(language)
    if parser is None:
        return None, f"no syntax checker for {language}"
    root = parser.parse(source.encode("utf-8")).root_node
    if not root.has_error:  # has_error covers ERROR nodes and MISSING ones
        return True, ""
    bad = _first_error(root)
    kind = f"missing {bad.type}" if bad.is_missing else "syntax error"
    return False, f"{kind} at line {bad.start_point[0] + 1}"


def _first_error(node):
    # A loop, not recursion: a tree may nest deeper than Python's recursion limit.
    while True:
        child = next((c for c in node.children if c.is_error or c.is_missing or c.has_error), None)
        if child is None:
            return node
        if child.is_error or child.is_missing:
            return child
        node = child


@functools.cache
def _parser(language: str):
    if language not in TREE_SITTER_GRAMMARS:
        return None
    # Loaded with the first sample in a language Python's own parser cannot check: a start that never needs one
    # (a Python repository, or `job status`) does not pay for tree-sitter and its grammars.
    import tree_sitter

    module, function = TREE_SITTER_GRAMMARS[language]
    return tree_sitter.Parser(tree_sitter.Language(getattr(importlib.import_module(module), function)()))


def functions(language: str, text: str) -> list[Construct]:
    """Every function of a file that parses, with a header to prompt with and a body to complete; [] otherwise."""
    if parses(language, text)[0] is not True:
        return []
    if language == "python":
        return _python_functions(text)
    return _braced_functions(language, text)


def identifiers(language: str, text: str) -> list[str] | None:
    """The identifiers in a piece of code, in order; None for a language without a parser here. The code need not
    be whole: Python's tokenizer keeps what it read before an error, tree-sitter parses around errors."""
    if language == "python":
        names = []
        try:
            for token in tokenize.generate_tokens(io.StringIO(text).readline):
                if token.type == tokenize.NAME and not keyword.iskeyword(token.string):
                    names.append(token.string)
        except (tokenize.TokenError, SyntaxError):
            pass
        return names
    parser = _parser(language)
    if parser is None:
        return None
    names, stack = [], [parser.parse(text.encode()).root_node]
    while stack:
        node = stack.pop()
        # identifier, field_identifier, type_identifier, property_identifier, ...: the grammars' leaf names; bash
        # names its variables, and its functions and commands are words.
        if node.child_count == 0 and (node.type.endswith("identifier") or node.type == "variable_name" or (
                node.type == "word" and node.parent.type in ("function_definition", "command_name"))):
            names.append(node.text.decode())
        stack.extend(reversed(node.children))
    return names


def lines_of(text: str) -> list[str]:
    """Lines with their ends, split at "\n" only (str.splitlines also splits at form feeds and the like, which
    neither Python's line numbers nor a file's lines do)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def line_starts(lines: list[str]) -> list[int]:
    """Where each of lines_of's lines begins: starts[i] is line i + 1's; the last entry is the text's length."""
    return list(itertools.accumulate((len(line) for line in lines), initial=0))


def _python_functions(text: str) -> list[Construct]:
    starts = line_starts(lines_of(text))
    found = []
    for node in ast.walk(ast.parse(text)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        body = node.body
        docstring = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                     and isinstance(body[0].value.value, str))
        rest = body[1:] if docstring else body
        first_line = min([node.lineno] + [d.lineno for d in node.decorator_list])
        # The header ends with the signature, or with the docstring when there is one; the body starts on a new line.
        header_last_line = body[0].end_lineno if docstring else body[0].lineno - 1
        if not rest or rest[0].lineno <= header_last_line or header_last_line < node.lineno:
            continue
        # The header stops short of its newline: byte-level BPE merges a newline with the indentation after it,
        # so a prompt ending in a bare newline is a token sequence training never showed before a body.
        header_end = starts[header_last_line] - 1
        if text[header_end - 1:header_end] == "\r":
            header_end -= 1
        found.append(Construct(starts[first_line - 1], header_end, starts[node.end_lineno]))
    return sorted(found, key=lambda c: c.start)


def _braced_functions(language: str, text: str) -> list[Construct]:
    data = text.encode("utf-8")
    root = _parser(language).parse(data).root_node
    found = []
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.type not in FUNCTION_NODES[language]:
            continue
        body = node.child_by_field_name("body")
        if body is None or not data[body.start_byte:body.start_byte + 1] == b"{" or body.end_byte != node.end_byte:
            continue
        begin = node
        while (begin.parent is not None and begin.parent.type == "export_statement"
               and begin.parent.end_byte == node.end_byte):
            begin = begin.parent
        # Comments and attributes directly above the function belong to its header: they document and qualify it.
        while begin.prev_sibling is not None and \
                any(kind in begin.prev_sibling.type for kind in ("comment", "attribute")) and \
                begin.prev_sibling.end_point[0] >= begin.start_point[0] - 1:
            begin = begin.prev_sibling
        line_start = data.rfind(b"\n", 0, begin.start_byte) + 1
        header_end = body.start_byte + 1
        if b"\n" not in data[header_end:body.end_byte]:
            continue  # a one-line body leaves nothing to complete on its own lines
        found.append(Construct(*(len(data[:offset].decode("utf-8"))
                                 for offset in (line_start, header_end, body.end_byte))))
    return sorted(found, key=lambda c: c.start)


def completion_end(language: str, header: str, completion: str) -> int | None:
    """Where the function that header opens ends inside completion (an index into it), or None if it goes on."""
    if language == "python":
        return _python_end(header, completion)
    if language in TREE_SITTER_GRAMMARS:
        return _brace_end(language, header, completion)
    return None


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _python_end(header: str, completion: str) -> int | None:
    """The first line that dedents to the def's level (or further) outside any string or bracket ends the body."""
    def_line = next(line for line in lines_of(header) if line.lstrip().startswith(("def ", "async def ")))
    level = _indent_of(def_line)
    offset = 0
    for number, line in enumerate(lines_of(completion)):
        # A header without its newline leaves the completion's first line as the rest of the header's last line.
        rest_of_header = number == 0 and not header.endswith("\n")
        # A partial last line already shows its indentation once it has a visible character.
        if (not rest_of_header and line.strip() and _indent_of(line) <= level
                and _complete_tokens(header + completion[:offset])):
            # Blank lines before the dedent separate the function from what follows; they are not its body.
            kept = completion[:offset].rstrip(" \t\n")
            return completion.index("\n", len(kept)) + 1 if kept else 0
        offset += len(line)
    return None


def _complete_tokens(source: str) -> bool:
    """False while source ends inside a string or an open bracket."""
    try:
        for _ in tokenize.generate_tokens(io.StringIO(source).readline):
            pass
    except tokenize.TokenError:
        return False
    except (IndentationError, SyntaxError):
        return True  # broken indentation still ends the lines it has
    return True


def _brace_end(language: str, header: str, completion: str) -> int | None:
    """Just after the brace that closes the one the header opened; strings and comments are skipped."""
    quotes = {"rust": '"', "bash": "\"'"}.get(language,
                                             "\"'`" if language in ("javascript", "typescript", "tsx") else "\"'")
    line_comment = "#" if language == "bash" else "//"
    text = header + completion
    depth, i, n = 0, 0, len(text)
    while i < n:
        ch = text[i]
        if text.startswith(line_comment, i) and (language != "bash" or i == 0 or text[i - 1] in " \t\n;"):
            newline = text.find("\n", i)
            i = n if newline < 0 else newline
            continue
        if language != "bash" and text.startswith("/*", i):
            close = text.find("*/", i + 2)
            i = n if close < 0 else close + 2
            continue
        if language == "rust" and ch == "'":
            # A char literal ('{', '\n', '\u{7b}'); otherwise a lifetime such as 'a, which has no closing quote.
            literal = _RUST_CHAR.match(text, i)
            i = literal.end() if literal else i + 1
            continue
        if ch in quotes:
            i += 1
            while i < n and text[i] != ch:
                i += 2 if text[i] == "\\" else 1
            i += 1
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and i >= len(header):
                return i + 1 - len(header)
        i += 1
    return None
