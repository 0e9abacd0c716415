// A goutube authorizer in JavaScript: grants written as JSON.
//
// The configuration is one JSON object:
//
//   {
//     "grants": [
//       { "subjects": ["alice"], "actions": ["produce", "consume"], "prefixes": ["uploads/alice/"] },
//       { "subjects": ["*"], "actions": ["metadata"], "prefixes": [""] },
//       { "subjects": ["player"], "actions": ["consume"], "match": "^videos/[^/]+\\.mp4$" }
//     ]
//   }
//
// A request is allowed by the first grant that lists its subject (or "*") and its action (or
// "*"), and whose point starts with one of its `prefixes` or matches its `match` (a regular
// expression); otherwise it is denied. A grant needs at least one of `prefixes` and `match`.
// A configuration that is not such an object fails `configure`: the node refuses to start (or
// keeps its old plugins on a reload) and says why.
//
// The node runs each call under its deadline (`timeout_ms`): a `match` that backtracks for ever
// on some point ends in a denial for that point, not a stuck node (docs/plugins.md).

import { log } from "goutube:plugins/log@0.2.0";

const ACTIONS = ["produce", "consume", "metadata", "replicate", "admin"];

let grants = [];

function list(grant, index, field) {
  const value = grant[field];
  if (value === undefined) return undefined;
  if (!Array.isArray(value) || value.some((item) => typeof item !== "string")) {
    throw `grant ${index}: "${field}" must be a list of strings`;
  }
  return value;
}

function parse(grant, index) {
  if (typeof grant !== "object" || grant === null) throw `grant ${index} is not an object`;
  const subjects = list(grant, index, "subjects") ?? [];
  const actions = list(grant, index, "actions") ?? [];
  if (subjects.length === 0) throw `grant ${index}: no "subjects"`;
  if (actions.length === 0) throw `grant ${index}: no "actions"`;
  for (const action of actions) {
    if (action !== "*" && !ACTIONS.includes(action)) throw `grant ${index}: no such action "${action}"`;
  }
  const prefixes = list(grant, index, "prefixes");
  let match;
  if (grant.match !== undefined) {
    try {
      match = new RegExp(grant.match);
    } catch (error) {
      throw `grant ${index}: bad "match": ${error.message}`;
    }
  }
  if (prefixes === undefined && match === undefined) throw `grant ${index}: give "prefixes" or "match"`;
  return { index, subjects, actions, prefixes: prefixes ?? [], match };
}

export function configure(config) {
  let parsed;
  try {
    parsed = JSON.parse(config);
  } catch (error) {
    throw `the configuration is not JSON: ${error.message}`;
  }
  if (!parsed || !Array.isArray(parsed.grants) || parsed.grants.length === 0) {
    throw 'the configuration needs a non-empty "grants" list';
  }
  grants = parsed.grants.map(parse);
  log("info", `${grants.length} grant(s)`);
}

export function authorize(request) {
  for (const grant of grants) {
    const who = grant.subjects.includes("*") || grant.subjects.includes(request.subject);
    const what = grant.actions.includes("*") || grant.actions.includes(request.action);
    const where =
      grant.prefixes.some((prefix) => request.point.startsWith(prefix)) ||
      (grant.match !== undefined && grant.match.test(request.point));
    if (who && what && where) {
      return { tag: "allow", val: `grant ${grant.index}` };
    }
  }
  return { tag: "deny", val: `no grant lets ${request.subject} ${request.action} "${request.point}"` };
}
