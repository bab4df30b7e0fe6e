#!/usr/bin/python3
"""Renders this chart without Helm, for CI machines that do not have it, and checks that every
manifest is valid YAML.

It understands exactly the template subset the chart uses, and fails on anything else (so a
template that would need real Helm cannot slip through unchecked):

  {{ .Values.a.b }}  {{ .Release.Name|Namespace|Service }}  {{ .Chart.Name|Version|AppVersion }}
  {{ X | quote }}    {{ toYaml X | nindent N }}   {{- ... -}} whitespace trimming
  {{- if X }} ... {{- else }} ... {{- end }}       (X truthy as in Go templates)

A missing value is an error (Helm would render an empty string). Usage:

  charts/waypoint/ci/render.py [--namespace NS] [--set key.path=value ...]   # prints the YAML
"""

import argparse
import copy
import json
import os
import re
import sys

import yaml

CHART = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ACTION = re.compile(r'{{(-?)\s*(.*?)\s*(-?)}}', re.S)


class TemplateError(Exception):
    pass


def lookup(ctx, path):
    if not path.startswith('.'):
        raise TemplateError('unsupported expression %r' % path)
    cur = ctx
    for part in path[1:].split('.'):
        if not isinstance(cur, dict) or part not in cur:
            raise TemplateError('no value at %s' % path)
        cur = cur[part]
    return cur


def go_str(v):
    if v is None:
        return ''
    if isinstance(v, bool):
        return 'true' if v else 'false'
    return str(v)


def evaluate(ctx, expr):
    stages = [s.strip() for s in expr.split('|')]
    first = stages[0].split()
    if len(first) == 2 and first[0] == 'toYaml':
        v = lookup(ctx, first[1])
        val = yaml.safe_dump(v, default_flow_style=False, sort_keys=True).rstrip('\n')
    elif len(first) == 1:
        val = lookup(ctx, first[0])
    else:
        raise TemplateError('unsupported expression %r' % expr)
    for st in stages[1:]:
        words = st.split()
        if words == ['quote']:
            val = json.dumps(go_str(val))
        elif len(words) == 2 and words[0] in ('nindent', 'indent'):
            pad = ' ' * int(words[1])
            val = '\n'.join(pad + ln if ln else ln for ln in go_str(val).split('\n'))
            if words[0] == 'nindent':
                val = '\n' + val
        else:
            raise TemplateError('unsupported pipeline stage %r' % st)
    return go_str(val)


def truthy(v):
    return v not in (None, False, 0, '', [], {})


def tokenize(text):
    """[('text', s) | ('action', expr)] with Go's {{- / -}} trimming applied."""
    out = []
    pos = 0
    for m in ACTION.finditer(text):
        chunk = text[pos:m.start()]
        if m.group(1):
            chunk = chunk.rstrip(' \t\r\n')
        out.append(['text', chunk])
        out.append(['action', m.group(2), bool(m.group(3))])
        pos = m.end()
    out.append(['text', text[pos:]])
    for i, tok in enumerate(out):
        if tok[0] == 'action' and tok[2] and i + 1 < len(out):
            out[i + 1][1] = out[i + 1][1].lstrip(' \t\r\n')
    return out


def render_text(text, ctx):
    out = []
    stack = []  # (active_before, branch_taken)
    active = True
    for tok in tokenize(text):
        if tok[0] == 'text':
            if active:
                out.append(tok[1])
            continue
        expr = tok[1]
        if expr.startswith('/*'):
            continue
        word = expr.split()[0] if expr.split() else ''
        if word == 'if':
            cond = active and truthy(lookup(ctx, expr.split(None, 1)[1].strip()))
            stack.append((active, cond))
            active = cond
        elif word == 'else':
            if not stack:
                raise TemplateError('else without if')
            before, taken = stack[-1]
            active = before and not taken
        elif word == 'end':
            if not stack:
                raise TemplateError('end without if')
            active = stack.pop()[0]
        elif active:
            out.append(evaluate(ctx, expr))
    if stack:
        raise TemplateError('unterminated if')
    return ''.join(out)


def set_value(values, assignment):
    key, _, raw = assignment.partition('=')
    cur = values
    parts = key.split('.')
    for p in parts[:-1]:
        cur = cur.setdefault(p, {})
    cur[parts[-1]] = yaml.safe_load(raw) if raw != '' else ''


def render(namespace='default', release='waypoint', sets=()):
    """{template file name: rendered text}."""
    with open(os.path.join(CHART, 'values.yaml')) as f:
        values = yaml.safe_load(f)
    with open(os.path.join(CHART, 'Chart.yaml')) as f:
        chart = yaml.safe_load(f)
    values = copy.deepcopy(values)
    for s in sets:
        set_value(values, s)
    ctx = {'Values': values,
           'Release': {'Name': release, 'Namespace': namespace, 'Service': 'Helm'},
           'Chart': {'Name': chart['name'], 'Version': chart['version'],
                     'AppVersion': chart['appVersion']}}
    out = {}
    tdir = os.path.join(CHART, 'templates')
    for name in sorted(os.listdir(tdir)):
        if not name.endswith('.yaml'):
            continue
        with open(os.path.join(tdir, name)) as f:
            try:
                out[name] = render_text(f.read(), ctx)
            except TemplateError as e:
                raise TemplateError('%s: %s' % (name, e))
    return out


def manifests(rendered):
    """Every non-empty YAML document of the rendered templates (raises on invalid YAML)."""
    docs = []
    for name, text in rendered.items():
        try:
            docs += [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as e:
            raise TemplateError('%s: invalid YAML after rendering: %s\n%s' % (name, e, text))
    return docs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--namespace', default='default')
    ap.add_argument('--release', default='waypoint')
    ap.add_argument('--set', action='append', default=[])
    a = ap.parse_args()
    try:
        rendered = render(a.namespace, a.release, a.set)
        manifests(rendered)
    except TemplateError as e:
        sys.exit('render.py: %s' % e)
    for name, text in rendered.items():
        if text.strip():
            print('---\n# Source: waypoint/templates/%s\n%s' % (name, text.strip('\n')))


if __name__ == '__main__':
    main()
