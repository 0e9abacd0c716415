"""A goutube authorizer in Python: rules match points by regular expression.

Each line of the configuration is one rule, `subject action regex`:

    alice   produce   ^uploads/alice/
    alice   consume   ^(uploads|videos)/
    *       metadata  .*

`subject` is a certificate's common name or `*` (anyone), `action` one of produce, consume,
metadata, replicate, admin or `*`. A request is allowed when a rule's subject and action match
and its regex matches the point (`re.search`); otherwise it is denied. Blank lines and lines that
start with `#` are ignored. A rule that does not parse, or whose regex does not compile, fails
`configure`: the node refuses to start (or keeps its old plugins on a reload) and says why.

The node runs each call under its deadline (`timeout_ms`): a regex that backtracks for ever on
some point ends in a denial for that point, not a stuck node (docs/plugins.md).
"""

import re

import wit_world
from wit_world.imports import log
from wit_world.imports.types import (
    Action,
    AuthzRequest,
    Decision,
    Decision_Allow,
    Decision_Deny,
)
from componentize_py_types import Err

ACTIONS = {action.name.lower(): action for action in Action}


class Rule:
    def __init__(self, number: int, line: str):
        fields = line.split(None, 2)
        if len(fields) != 3:
            raise ValueError(f"line {number}: expected `subject action regex`, got {line!r}")
        self.subject, action, pattern = fields
        if action != "*" and action not in ACTIONS:
            raise ValueError(f"line {number}: no such action {action!r}")
        self.action = None if action == "*" else ACTIONS[action]
        try:
            self.regex = re.compile(pattern)
        except re.error as error:
            raise ValueError(f"line {number}: bad regex {pattern!r}: {error}") from None
        self.text = line

    def allows(self, request: AuthzRequest) -> bool:
        return (
            self.subject in ("*", request.subject)
            and self.action in (None, request.action)
            and self.regex.search(request.point) is not None
        )


RULES: list[Rule] = []


class WitWorld(wit_world.WitWorld):
    def configure(self, config: str) -> None:
        rules = []
        for number, line in enumerate(config.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                rules.append(Rule(number, line))
            except ValueError as error:
                raise Err(str(error))
        if not rules:
            raise Err("no rules: write at least one line `subject action regex`")
        RULES[:] = rules
        log.log(log.Level.INFO, f"{len(rules)} rule(s)")

    def authorize(self, request: AuthzRequest) -> Decision:
        for rule in RULES:
            if rule.allows(request):
                return Decision_Allow(f"rule `{rule.text}`")
        action = request.action.name.lower()
        return Decision_Deny(f"no rule lets {request.subject} {action} {request.point!r}")
