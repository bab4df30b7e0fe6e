#!/usr/bin/python3
# proto-check: our hand-written SUBSET .proto files (xds-client/proto/) against upstream.
#
# What it checks
#   Every message, field and enum value that we declare must exist upstream with the same
#   field number, type (scalar type, or message/enum kind + fully-qualified type name), label
#   (optional/repeated/required), real-oneof membership, proto3-optional presence, effective
#   packed encoding and file syntax.  Upstream may have more (we declare a subset); we may not
#   have anything upstream lacks.
#
# Where "upstream" comes from
#   * Envoy data-plane-api, cncf/xds (+ udpa), googleapis (google/rpc), protoc-gen-validate:
#     the npm package @grpc/grpc-js-xds, pinned below (PKG_VERSION), which ships them under
#     deps/{envoy-api,xds,googleapis,protoc-gen-validate}.  Installed on first run into
#     <builddir>/proto-check (npm install --ignore-scripts), reused afterwards.
#   * The package's deps/ trees are older than upstream HEAD (e.g. it lacks
#     Listener.tcp_keepalive = 37).  upstream_supplement.json lists, from pinned newer commits
#     of envoyproxy/data-plane-api and cncf/xds, exactly the messages/fields/enum values our
#     tree declares that the package lacks; it is consulted only for names the package does not
#     have (the package wins otherwise, and entries it has caught up with are noted).  When we
#     declare something new that the package lacks, regenerate it (make-supplement, with
#     `git archive <commit> envoy | tar -x -C DIR` of data-plane-api, `... xds udpa` of cncf/xds).
#   * google/protobuf/*.proto (well-known types): the copies that ship with protoc.
#   * Protos that package does not carry (istio.workload, stats.PluginConfig, istio.v1.auth
#     CA service): istio_reference.json next to this script, a listing of upstream field
#     numbers/types/labels with the upstream repository, commit and path it was derived from.
#     It is facts only, not a copy of the upstream files.  Regenerate it with
#       proto_check.py make-reference istio_reference.json \
#           istio/ztunnel@<commit>:proto/workload.proto=<dir holding proto/workload.proto> ...
#     (extract each file with `git show <commit>:<path>` under <dir> first).
#   Both sides are compiled with protoc to FileDescriptorSets and compared with
#   google.protobuf.descriptor_pb2 (python3-protobuf).
#
# Known quirk of the pinned package: its protoc-gen-validate validate.proto predates
#   StringRules.ignore_empty (field 26), which the Envoy files use.  protobuf.js does not care,
#   protoc does; we compile against a copy with exactly that one field added (VALIDATE_PATCHES).
#   Options never influence field numbers/types, so this cannot hide a mismatch.
#
# Allowed differences: only ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL (see its comment).
#
#   An entry that is no longer needed is reported too, so the list cannot go stale.
#
# Self-test: after the real check (whatever its result), the script breaks temporary copies of
#   our tree, one line each: field number, scalar type, label, proto3 `optional` added, a field
#   and a message upstream lacks, a field checked via istio_reference.json, a field checked via
#   upstream_supplement.json; and it re-checks with an empty proto3-optional allowlist.  The
#   test fails unless every break is reported, so the check is proven able to fail on every run.
#
# Usage (meson runs the first form as test 'xds-client/proto-check', suite 'unit'):
#   proto_check.py check --proto-root xds-client/proto --cache-dir <builddir>/proto-check
#                        [--no-self-test]
#   proto_check.py make-reference OUT.json OWNER/REPO@COMMIT:PATH=LOCALROOT...
#   proto_check.py make-supplement OUT.json --proto-root DIR --cache-dir DIR
#                        --upstream OWNER/REPO@COMMIT=LOCALROOT...
# Exit status: 0 ok, 1 mismatch or error, 77 skipped (npm not installed or registry
# unreachable; the reason is printed).

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

try:
    from google.protobuf import descriptor_pb2
except ImportError:
    sys.stderr.write('proto-check: python3-protobuf (google.protobuf) is missing; '
                     'run with /usr/bin/python3 and install python3-protobuf\n')
    sys.exit(1)

PKG_NAME = '@grpc/grpc-js-xds'
PKG_VERSION = '1.14.1'
PKG_DEPS = ('envoy-api', 'xds', 'googleapis', 'protoc-gen-validate')
EXIT_SKIP = 77

# (file relative to the package's protoc-gen-validate dir, anchor line, line added after it)
VALIDATE_PATCHES = [
    ('validate/validate.proto', 'optional bool strict = 25 [default = true];',
     'optional bool ignore_empty = 26;'),
]

# Fields where upstream is proto3 `optional` (explicit presence) and ours is a plain proto3
# scalar.  protoc-c 1.4 cannot generate proto3 optional; the wire encoding is identical, we only
# lose "present but zero" vs "absent".  Each entry must be justified by the C code that reads it.
ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL = {
    # CIDR prefix length. Upstream: absent = host address (/32 or /128), present = CIDR range.
    # With a plain field, absent and an explicit 0 (a /0 range) both read as 0; our code must
    # take 0 as "host address" (a /0 waypoint/service address is not something istiod sends).
    ('istio.workload.NetworkAddress', 'length'),
}

HERE = os.path.dirname(os.path.abspath(__file__))
REFERENCE_JSON = os.path.join(HERE, 'istio_reference.json')
SUPPLEMENT_JSON = os.path.join(HERE, 'upstream_supplement.json')

FDP = descriptor_pb2.FieldDescriptorProto
SCALAR_NAMES = {
    FDP.TYPE_DOUBLE: 'double', FDP.TYPE_FLOAT: 'float', FDP.TYPE_INT64: 'int64',
    FDP.TYPE_UINT64: 'uint64', FDP.TYPE_INT32: 'int32', FDP.TYPE_FIXED64: 'fixed64',
    FDP.TYPE_FIXED32: 'fixed32', FDP.TYPE_BOOL: 'bool', FDP.TYPE_STRING: 'string',
    FDP.TYPE_BYTES: 'bytes', FDP.TYPE_UINT32: 'uint32', FDP.TYPE_SFIXED32: 'sfixed32',
    FDP.TYPE_SFIXED64: 'sfixed64', FDP.TYPE_SINT32: 'sint32', FDP.TYPE_SINT64: 'sint64',
}
PACKABLE = set(SCALAR_NAMES) - {FDP.TYPE_STRING, FDP.TYPE_BYTES} | {FDP.TYPE_ENUM}
LABEL_NAMES = {FDP.LABEL_OPTIONAL: 'optional', FDP.LABEL_REPEATED: 'repeated',
               FDP.LABEL_REQUIRED: 'required'}


class Skip(Exception):
    pass


class Fail(Exception):
    pass


def log(msg):
    sys.stdout.write('proto-check: %s\n' % msg)
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------
# Model: {'messages': {full: {'syntax': s, 'file': f, 'line': n, 'fields': {name: F}}},
#         'enums': {full: {'file': f, 'line': n, 'values': {name: number}}}}
# F = {'number', 'type', 'label', 'oneof', 'packed', 'line'}; label 'proto3_optional' for
# proto3 optional fields (LABEL_OPTIONAL + explicit presence); oneof only for real oneofs.

def field_type(f):
    if f.type == FDP.TYPE_MESSAGE:
        return 'message ' + f.type_name
    if f.type == FDP.TYPE_ENUM:
        return 'enum ' + f.type_name
    if f.type == FDP.TYPE_GROUP:
        return 'group ' + f.type_name
    return SCALAR_NAMES[f.type]


def model_from_fds(fds, only_files=None):
    model = {'messages': {}, 'enums': {}}
    for fd in fds.file:
        if only_files is not None and fd.name not in only_files:
            continue
        syntax = fd.syntax or 'proto2'
        lines = {}
        for loc in fd.source_code_info.location:
            lines[tuple(loc.path)] = loc.span[0] + 1
        prefix = '.'.join([fd.package]) if fd.package else ''

        def add_enum(e, scope, path):
            full = (scope + '.' if scope else '') + e.name
            model['enums'][full] = {'file': fd.name, 'line': lines.get(path, 0),
                                    'values': {v.name: v.number for v in e.value}}

        def add_msg(m, scope, path):
            full = (scope + '.' if scope else '') + m.name
            fields = {}
            for i, f in enumerate(m.field):
                oneof = None
                if f.HasField('oneof_index') and not f.proto3_optional:
                    oneof = m.oneof_decl[f.oneof_index].name
                if f.label == FDP.LABEL_REPEATED and f.type in PACKABLE:
                    if f.options.HasField('packed'):
                        packed = f.options.packed
                    else:
                        packed = syntax == 'proto3'
                else:
                    packed = False
                fields[f.name] = {
                    'number': f.number, 'type': field_type(f),
                    'label': 'proto3_optional' if f.proto3_optional else LABEL_NAMES[f.label],
                    'oneof': oneof, 'packed': packed,
                    'file': fd.name, 'line': lines.get(path + (2, i), 0)}
            model['messages'][full] = {'syntax': syntax, 'file': fd.name,
                                       'line': lines.get(path, 0), 'fields': fields}
            for i, n in enumerate(m.nested_type):
                add_msg(n, full, path + (3, i))
            for i, e in enumerate(m.enum_type):
                add_enum(e, full, path + (4, i))

        for i, m in enumerate(fd.message_type):
            add_msg(m, prefix, (4, i))
        for i, e in enumerate(fd.enum_type):
            add_enum(e, prefix, (5, i))
    return model


def model_from_reference(ref):
    model = {'messages': {}, 'enums': {}}
    for full, m in ref['messages'].items():
        fields = {}
        for name, spec in m['fields'].items():
            fields[name] = {'number': spec[0], 'type': spec[1], 'label': spec[2],
                            'oneof': spec[3] if len(spec) > 3 else None,
                            'packed': m['packed'].count(name) > 0 if 'packed' in m else False,
                            'file': m['source'], 'line': 0}
        model['messages'][full] = {'syntax': m['syntax'], 'file': m['source'], 'line': 0,
                                   'fields': fields}
    for full, e in ref['enums'].items():
        model['enums'][full] = {'file': e['source'], 'line': 0, 'values': dict(e['values'])}
    return model


def listing_message(m, source, names=None):
    fields = {}
    packed = []
    for name, f in sorted(m['fields'].items(), key=lambda kv: kv[1]['number']):
        if names is not None and name not in names:
            continue
        spec = [f['number'], f['type'], f['label']]
        if f['oneof']:
            spec.append(f['oneof'])
        fields[name] = spec
        if f['packed']:
            packed.append(name)
    entry = {'source': source, 'syntax': m['syntax'], 'fields': fields}
    if packed:
        entry['packed'] = packed
    return entry


def listing_enum(e, source, names=None):
    return {'source': source,
            'values': dict(sorted(((n, v) for n, v in e['values'].items()
                                   if names is None or n in names), key=lambda kv: kv[1]))}


def reference_from_model(model, source):
    return {'messages': {k: listing_message(m, source)
                         for k, m in sorted(model['messages'].items())},
            'enums': {k: listing_enum(e, source) for k, e in sorted(model['enums'].items())}}


def merge_listing(model, extra):
    """Adds what model lacks from extra (per message, field, enum, enum value); returns the
    names extra lists that model already has (model is authoritative for those)."""
    dup = []
    for full, m in extra['messages'].items():
        have = model['messages'].get(full)
        if have is None:
            model['messages'][full] = m
            continue
        for name, f in m['fields'].items():
            if name in have['fields']:
                dup.append('%s.%s' % (full, name))
            else:
                have['fields'][name] = f
    for full, e in extra['enums'].items():
        have = model['enums'].get(full)
        if have is None:
            model['enums'][full] = e
            continue
        for name, v in e['values'].items():
            if name in have['values']:
                dup.append('%s.%s' % (full, name))
            else:
                have['values'][name] = v
    return dup


def write_listing(path, out):
    text = json.dumps(out, indent=1)
    # one line per field spec / enum value list: [1, "string", "optional"]
    text = re.sub(r'\[\s+([^\[\]{}]*?)\s+\]',
                  lambda m: '[' + re.sub(r',\s+', ', ', m.group(1)) + ']', text)
    with open(path, 'w') as f:
        f.write(text + '\n')


# ------------------------------------------------------------------------------------------

def compare(ours, upstream, allow=ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL):
    """Returns a list of (file, line, message) mismatches of ours against upstream."""
    errs = []
    used = set()

    def err(where, msg):
        errs.append((where['file'], where['line'], msg))

    for full, m in sorted(ours['messages'].items()):
        um = upstream['messages'].get(full)
        if um is None:
            what = 'enum' if full in upstream['enums'] else 'nothing'
            err(m, 'message %s does not exist upstream (upstream has %s of that name)'
                % (full, what))
            continue
        if m['syntax'] != um['syntax']:
            err(m, 'message %s: syntax %s, upstream %s (%s)'
                % (full, m['syntax'], um['syntax'], um['file']))
        for name, f in sorted(m['fields'].items(), key=lambda kv: kv[1]['number']):
            uf = um['fields'].get(name)
            fq = '%s.%s' % (full, name)
            if uf is None:
                by_num = [n for n, x in um['fields'].items() if x['number'] == f['number']]
                hint = (' (upstream number %d is %r)' % (f['number'], by_num[0])) if by_num else ''
                err(f, 'field %s = %d does not exist upstream%s' % (fq, f['number'], hint))
                continue
            if f['number'] != uf['number']:
                err(f, 'field %s: number %d, upstream %d' % (fq, f['number'], uf['number']))
            if f['type'] != uf['type']:
                err(f, 'field %s: type %s, upstream %s' % (fq, f['type'], uf['type']))
            label, ulabel = f['label'], uf['label']
            if label != ulabel:
                if (label == 'optional' and ulabel == 'proto3_optional'
                        and (full, name) in allow):
                    used.add((full, name))
                elif label == 'optional' and ulabel == 'proto3_optional':
                    err(f, 'field %s: label plain (implicit presence), upstream proto3 optional '
                        '(not in ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL)' % fq)
                else:
                    err(f, 'field %s: label %s, upstream %s' % (fq, label, ulabel))
            if f['oneof'] != uf['oneof']:
                err(f, 'field %s: oneof %s, upstream oneof %s'
                    % (fq, f['oneof'] or '(none)', uf['oneof'] or '(none)'))
            if f['packed'] != uf['packed'] and f['type'] == uf['type'] and label == ulabel:
                err(f, 'field %s: packed=%s, upstream packed=%s'
                    % (fq, f['packed'], uf['packed']))
    for full, name in sorted(allow - used):
        f = ours['messages'].get(full, {'fields': {}})['fields'].get(name)
        if f is not None:
            err(f, 'field %s.%s is in ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL but no longer needs '
                'it; remove the entry' % (full, name))
    for full, e in sorted(ours['enums'].items()):
        ue = upstream['enums'].get(full)
        if ue is None:
            err(e, 'enum %s does not exist upstream' % full)
            continue
        for name, num in sorted(e['values'].items(), key=lambda kv: kv[1]):
            if name not in ue['values']:
                err(e, 'enum value %s.%s = %d does not exist upstream' % (full, name, num))
            elif ue['values'][name] != num:
                err(e, 'enum value %s.%s: %d, upstream %d'
                    % (full, name, num, ue['values'][name]))
    return errs


# ------------------------------------------------------------------------------------------

def find_protoc():
    p = shutil.which('protoc')
    if not p:
        raise Fail('protoc not found (Debian package protobuf-compiler)')
    return p


def wkt_include(protoc):
    """The directory holding the well-known types shipped with protoc."""
    cands = [os.path.join(os.path.dirname(os.path.realpath(protoc)), '..', 'include'),
             '/usr/include', '/usr/local/include']
    for c in cands:
        if os.path.isfile(os.path.join(c, 'google', 'protobuf', 'descriptor.proto')):
            return os.path.abspath(c)
    raise Fail('google/protobuf/descriptor.proto not found next to protoc (%s)' % protoc)


def run_protoc(protoc, includes, files, out, source_info=False):
    cmd = [protoc] + ['-I' + i for i in includes] + ['--include_imports', '-o', out]
    if source_info:
        cmd.append('--include_source_info')
    cmd += files
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise Fail('protoc failed (%s):\n%s' % (' '.join(cmd[:1 + len(includes)]) + ' ...',
                                                r.stdout))
    fds = descriptor_pb2.FileDescriptorSet()
    with open(out, 'rb') as f:
        fds.ParseFromString(f.read())
    return fds


NET_ERRORS = ('ENOTFOUND', 'EAI_AGAIN', 'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT',
              'ENETUNREACH', 'EHOSTUNREACH', 'ESOCKETTIMEDOUT', 'ERR_SOCKET_TIMEOUT',
              'getaddrinfo')


def ensure_package(cache_dir):
    """Installs the pinned package into cache_dir if it is not there; returns its deps dir."""
    pkg_dir = os.path.join(cache_dir, 'node_modules', *PKG_NAME.split('/'))
    pkg_json = os.path.join(pkg_dir, 'package.json')

    def installed():
        try:
            with open(pkg_json) as f:
                ok = json.load(f).get('version') == PKG_VERSION
        except (OSError, ValueError):
            return False
        return ok and all(os.path.isdir(os.path.join(pkg_dir, 'deps', d)) for d in PKG_DEPS)

    os.makedirs(cache_dir, exist_ok=True)
    with open(os.path.join(cache_dir, '.lock'), 'w') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed():
            log('using cached %s@%s in %s' % (PKG_NAME, PKG_VERSION, cache_dir))
            return os.path.join(pkg_dir, 'deps')
        npm = shutil.which('npm')
        if not npm:
            raise Skip('npm is not installed, so the pinned upstream protos (%s@%s) cannot be '
                       'fetched; install npm (Debian package npm) to run this check'
                       % (PKG_NAME, PKG_VERSION))
        cmd = [npm, 'install', '--prefix', cache_dir, '%s@%s' % (PKG_NAME, PKG_VERSION),
               '--no-audit', '--no-fund', '--ignore-scripts']
        env = dict(os.environ, npm_config_fetch_retries='1',
                   npm_config_fetch_timeout='60000', npm_config_update_notifier='false')
        log('installing: %s' % ' '.join(cmd))
        t0 = time.monotonic()
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=env, timeout=600)
        except subprocess.TimeoutExpired:
            raise Skip('npm install did not finish within 600 s; the npm registry looks '
                       'unreachable')
        if r.returncode != 0:
            if any(e in r.stdout for e in NET_ERRORS):
                raise Skip('the npm registry is unreachable (npm install %s@%s failed with a '
                           'network error):\n%s' % (PKG_NAME, PKG_VERSION, r.stdout.strip()))
            raise Fail('npm install %s@%s failed (not a network error):\n%s'
                       % (PKG_NAME, PKG_VERSION, r.stdout.strip()))
        if not installed():
            raise Fail('npm install succeeded but %s@%s with deps/{%s} is not in %s'
                       % (PKG_NAME, PKG_VERSION, ','.join(PKG_DEPS), pkg_dir))
        log('installed %s@%s in %.1f s' % (PKG_NAME, PKG_VERSION, time.monotonic() - t0))
        return os.path.join(pkg_dir, 'deps')


def make_validate_overlay(deps, overlay):
    for rel, anchor, add in VALIDATE_PATCHES:
        src = os.path.join(deps, 'protoc-gen-validate', rel)
        with open(src, newline='') as f:
            text = f.read()
        if re.search(r'\b%s\b' % re.escape(add.split('=')[0].split()[-1]) + r'\s*=', text):
            continue  # upstream caught up; nothing to add
        out_lines = []
        hits = 0
        for line in text.splitlines(keepends=True):
            out_lines.append(line)
            if line.strip() == anchor:
                indent = line[:len(line) - len(line.lstrip())]
                eol = line[len(line.rstrip('\r\n')):] or '\n'
                out_lines.append(indent + add + eol)
                hits += 1
        if hits != 1:
            raise Fail('cannot patch %s: anchor %r found %d times' % (src, anchor, hits))
        dst = os.path.join(overlay, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with open(dst, 'w', newline='') as f:
            f.write(''.join(out_lines))


def list_protos(root):
    out = []
    for d, _, files in os.walk(root):
        for n in files:
            if n.endswith('.proto'):
                out.append(os.path.relpath(os.path.join(d, n), root))
    return sorted(out)


class Upstream:
    def __init__(self, protoc, deps, workdir):
        self.protoc = protoc
        self.wkt = wkt_include(protoc)
        overlay = os.path.join(workdir, 'validate-overlay')
        make_validate_overlay(deps, overlay)
        # overlay first so the patched validate.proto wins; WKT last (protoc's own copies).
        self.includes = [overlay] + [os.path.join(deps, d) for d in PKG_DEPS] + [self.wkt]
        self.workdir = workdir
        with open(REFERENCE_JSON) as f:
            self.ref = json.load(f)
        self.ref_model = model_from_reference(self.ref)
        with open(SUPPLEMENT_JSON) as f:
            self.sup = json.load(f)
        self.sup_obsolete = []
        self.cache = {}

    def origin(self, rel):
        for inc in self.includes:
            if os.path.isfile(os.path.join(inc, rel)):
                return inc
        return None

    def model_for(self, rels):
        """Upstream model for our files rels: compiled package files + the reference."""
        key = tuple(rels)
        if key in self.cache:
            return self.cache[key]
        files = [r for r in rels if self.origin(r)]
        fds = run_protoc(self.protoc, self.includes, files,
                         os.path.join(self.workdir, 'upstream.pb'))
        model = model_from_fds(fds)
        merge_listing(model, model_from_reference(self.ref))
        self.sup_obsolete = merge_listing(model, model_from_reference(self.sup))
        self.cache[key] = model
        return model


def check_tree(up, root, workdir, verbose):
    rels = list_protos(root)
    if not rels:
        raise Fail('no .proto files under %s' % root)
    fds = run_protoc(up.protoc, [root], rels, os.path.join(workdir, 'ours.pb'),
                     source_info=True)
    ours = model_from_fds(fds, only_files=set(rels))
    upstream = up.model_for(rels)
    if verbose:
        ref_pkgs = sorted({s['package'] for s in up.ref['sources']})
        for r in rels:
            o = up.origin(r)
            if o == up.wkt:
                log('  %-72s <- protoc %s' % (r, o))
            elif o:
                log('  %-72s <- %s deps/%s' % (r, PKG_NAME, os.path.basename(o)))
            else:
                log('  %-72s <- istio_reference.json (%s)' % (r, ', '.join(ref_pkgs)))
    errs = compare(ours, upstream)
    nfields = sum(len(m['fields']) for m in ours['messages'].values())
    return errs, (len(rels), len(ours['messages']), nfields, len(ours['enums']))


# ------------------------------------------------------------------------------------------
# Self-test: mutations of a temporary copy of our tree that the check must report.

def _pick_field(ours, pred):
    """First field (by message name, field number) with pred(message, field name, field)."""
    for full in sorted(ours['messages']):
        m = ours['messages'][full]
        for name, f in sorted(m['fields'].items(), key=lambda kv: kv[1]['number']):
            if f['line'] and not full.endswith('Entry') and pred(full, name, f):
                return full, name, m['file'], f['line']
    return None


def _need(pick):
    if pick is None:
        raise Fail('self-test: our tree has no field suitable for a mutation')
    return pick


def _edit_line(path, line, fn):
    with open(path) as f:
        lines = f.readlines()
    new = fn(lines[line - 1])
    if new == lines[line - 1]:
        raise Fail('self-test: mutation did not change %s:%d: %r' % (path, line, new))
    lines[line - 1] = new
    with open(path, 'w') as f:
        f.writelines(lines)


def _bump_number(s):
    return re.sub(r'=\s*(\d+)', lambda m: '= %d' % (int(m.group(1)) + 500), s, count=1)


def self_test(up, root, workdir):
    """Each mutation edits one line of a copy of our tree; the check must report it."""
    rels = list_protos(root)
    fds = run_protoc(up.protoc, [root], rels, os.path.join(workdir, 'st.pb'), source_info=True)
    ours = model_from_fds(fds, only_files=set(rels))
    ref_msgs = set(up.ref['messages'])
    sup = {(k, n) for k, m in up.sup['messages'].items() for n in m['fields']}

    def plain(full, name, f):  # a package-checked singular non-oneof field
        return (full not in ref_msgs and (full, name) not in sup and f['label'] == 'optional'
                and f['oneof'] is None)

    def plain_str(full, name, f):
        return plain(full, name, f) and f['type'] == 'string'

    muts = []  # (description, file, line or None for "the syntax line", edit, expected text)

    full, name, fn, ln = _need(_pick_field(ours, plain))
    muts.append(('field number +500: %s.%s in %s' % (full, name, fn), fn, ln, _bump_number,
                 'field %s.%s: number' % (full, name)))
    full, name, fn, ln = _need(_pick_field(ours, plain_str))
    muts.append(('type string -> bytes: %s.%s in %s' % (full, name, fn), fn, ln,
                 lambda s: re.sub(r'\bstring\b', 'bytes', s, count=1),
                 'field %s.%s: type bytes, upstream string' % (full, name)))
    muts.append(('label -> repeated: %s.%s in %s' % (full, name, fn), fn, ln,
                 lambda s: re.sub(r'^(\s*)', r'\1repeated ', s, count=1),
                 'field %s.%s: label repeated, upstream optional' % (full, name)))
    muts.append(('extra field: %s.wp_selftest_bogus in %s' % (full, fn), fn, ln,
                 lambda s: s.rstrip('\n') + ' uint32 wp_selftest_bogus = 536870000;\n',
                 'field %s.wp_selftest_bogus = 536870000 does not exist upstream' % full))
    muts.append(('proto3 optional added: %s.%s in %s' % (full, name, fn), fn, ln,
                 lambda s: re.sub(r'^(\s*)', r'\1optional ', s, count=1),
                 'field %s.%s: label proto3_optional, upstream optional' % (full, name)))
    muts.append(('extra message: WpSelftestBogus in %s' % fn, fn, None,
                 lambda s: s.rstrip('\n') + ' message WpSelftestBogus { uint32 x = 1; }\n',
                 'WpSelftestBogus does not exist upstream'))
    full, name, fn, ln = _need(_pick_field(ours, lambda m, n, f: m in ref_msgs))
    muts.append(('field number +500 (istio_reference.json path): %s.%s in %s'
                 % (full, name, fn), fn, ln, _bump_number,
                 'field %s.%s: number' % (full, name)))
    pick = _pick_field(ours, lambda m, n, f: (m, n) in sup)
    if pick:  # the supplement must not be a blanket pass either
        full, name, fn, ln = pick
        muts.append(('field number +500 (upstream_supplement.json path): %s.%s in %s'
                     % (full, name, fn), fn, ln, _bump_number,
                     'field %s.%s: number' % (full, name)))

    failed = 0
    # The proto3-optional allowlist is exact: without it, each entry must be reported.
    upstream = up.model_for(rels)
    for full, name in sorted(ALLOWED_PLAIN_FOR_PROTO3_OPTIONAL):
        expect = 'field %s.%s: label plain (implicit presence), upstream proto3 optional' % (
            full, name)
        got = [e for e in compare(ours, upstream, allow=set()) if expect in e[2]]
        if full in ours['messages'] and not got:
            log('SELF-TEST FAIL: with an empty allowlist, %s.%s was NOT reported' % (full, name))
            failed += 1
        elif got:
            log('self-test ok: empty allowlist -> %s:%d: %s' % got[0])
    for i, (desc, fn, ln, edit, expect) in enumerate(muts):
        tree = os.path.join(workdir, 'selftest-%d' % i)
        shutil.copytree(root, tree)
        path = os.path.join(tree, fn)
        if ln is None:
            with open(path) as f:
                ln = 1 + next(k for k, l in enumerate(f) if l.startswith('syntax'))
        _edit_line(path, ln, edit)
        out = tree + '-out'
        os.makedirs(out)
        try:
            errs, _ = check_tree(up, tree, out, False)
        except Fail as e:
            log('SELF-TEST FAIL: %s: the check errored instead of reporting it: %s' % (desc, e))
            failed += 1
            continue
        hit = [e for e in errs if expect in e[2]]
        if hit:
            log('self-test ok: %s -> %s:%d: %s' % (desc, hit[0][0], hit[0][1], hit[0][2]))
        else:
            log('SELF-TEST FAIL: %s was NOT detected (expected "%s"; got %r)'
                % (desc, expect, errs))
            failed += 1
        shutil.rmtree(tree)
        shutil.rmtree(out)
    return failed


# ------------------------------------------------------------------------------------------

def cmd_check(args):
    t0 = time.monotonic()
    root = os.path.abspath(args.proto_root)
    cache = os.path.abspath(args.cache_dir)
    protoc = find_protoc()
    r = subprocess.run([protoc, '--version'], stdout=subprocess.PIPE, text=True)
    log('%s, python protobuf descriptor_pb2, %s@%s' % (r.stdout.strip(), PKG_NAME,
                                                         PKG_VERSION))
    deps = ensure_package(cache)
    with tempfile.TemporaryDirectory(prefix='proto-check-') as work:
        up = Upstream(protoc, deps, work)
        for s in up.ref['sources']:
            log('reference: %s (%s@%s:%s)' % (s['package'], s['repo'], s['commit'], s['path']))
        for s in up.sup.get('sources', []):
            log('supplement (names the package lacks): %s@%s' % (s['repo'], s['commit']))
        errs, stats = check_tree(up, root, work, True)
        for n in up.sup_obsolete:
            log('note: upstream_supplement.json entry %s is now in the package; it can be '
                'dropped (make-supplement)' % n)
        log('compared %d files, %d messages, %d fields, %d enums' % stats)
        for f, ln, msg in errs:
            sys.stdout.write('%s:%d: %s\n' % (os.path.join(args.proto_root, f), ln, msg))
        if errs:
            log('FAIL: %d mismatch(es) against upstream' % len(errs))
        else:
            log('no mismatches')
        st_failed = 0
        if not args.no_self_test:
            st_failed = self_test(up, root, work)
            if st_failed:
                log('FAIL: %d self-test mutation(s) not detected' % st_failed)
    log('done in %.1f s' % (time.monotonic() - t0))
    return 1 if errs or st_failed else 0


def cmd_make_reference(args):
    protoc = find_protoc()
    wkt = wkt_include(protoc)
    out = {'_comment': 'Upstream field numbers/types/labels for protos not shipped in %s; '
                       'generated by tests/proto-check/proto_check.py make-reference. '
                       'Field spec: [number, type, label(, real oneof)]. '
                       'label "proto3_optional" = proto3 optional.' % PKG_NAME,
           'sources': [], 'messages': {}, 'enums': {}}
    with tempfile.TemporaryDirectory() as work:
        for spec in args.specs:
            m = re.fullmatch(r'([\w.-]+/[\w.-]+)@([0-9a-f]{40}):([^=]+)=(.+)', spec)
            if not m:
                raise Fail('bad spec %r (want OWNER/REPO@COMMIT40:PATH=LOCALROOT)' % spec)
            repo, commit, path, local = m.groups()
            fds = run_protoc(protoc, [local, wkt], [path], os.path.join(work, 'x.pb'))
            model = model_from_fds(fds, only_files={path})
            pkg = [fd.package for fd in fds.file if fd.name == path][0]
            out['sources'].append({'package': pkg, 'repo': repo, 'commit': commit,
                                   'path': path})
            part = reference_from_model(model, '%s@%s:%s' % (repo, commit[:12], path))
            out['messages'].update(part['messages'])
            out['enums'].update(part['enums'])
    write_listing(args.out, out)
    log('wrote %s: %d messages, %d enums' % (args.out, len(out['messages']),
                                             len(out['enums'])))
    return 0


def cmd_make_supplement(args):
    """Lists, from newer upstream checkouts, exactly what our tree declares that the pinned
    package lacks (the facts needed to check it, nothing more)."""
    protoc = find_protoc()
    root = os.path.abspath(args.proto_root)
    deps = ensure_package(os.path.abspath(args.cache_dir))
    roots = []
    for spec in args.upstream:
        m = re.fullmatch(r'([\w.-]+/[\w.-]+)@([0-9a-f]{40})=(.+)', spec)
        if not m:
            raise Fail('bad --upstream %r (want OWNER/REPO@COMMIT40=LOCALROOT)' % spec)
        roots.append(m.groups())
    out = {'_comment': 'Upstream facts for what our subset declares that %s@%s does not ship '
                       '(its deps/ trees are older than upstream HEAD); generated by '
                       'tests/proto-check/proto_check.py make-supplement. Used only for '
                       'names missing from the package. Field spec as in istio_reference.json.'
                       % (PKG_NAME, PKG_VERSION),
           'sources': [{'repo': r, 'commit': c} for r, c, _ in roots],
           'messages': {}, 'enums': {}}
    with tempfile.TemporaryDirectory() as work:
        up = Upstream(protoc, deps, work)
        up.sup = {'messages': {}, 'enums': {}}
        rels = list_protos(root)
        ours = model_from_fds(run_protoc(protoc, [root], rels, os.path.join(work, 'o.pb')),
                              only_files=set(rels))
        pkg = up.model_for(rels)
        newer_inc = [up.includes[0]] + [os.path.abspath(l) for _, _, l in roots] + \
            up.includes[1:]
        files = [r for r in rels if up.origin(r)]
        newer = model_from_fds(run_protoc(protoc, newer_inc, files, os.path.join(work, 'n.pb')))

        def source(fname):
            for r, c, l in roots:
                if os.path.isfile(os.path.join(l, fname)):
                    return '%s@%s:%s' % (r, c[:12], fname)
            raise Fail('%s is not from any --upstream root' % fname)

        for full, m in sorted(ours['messages'].items()):
            nm = newer['messages'].get(full)
            pm = pkg['messages'].get(full)
            if nm is None:
                continue  # not upstream at all: the check reports it
            missing = (set(m['fields']) - set(pm['fields'] if pm else ())) & set(nm['fields'])
            if pm is None or missing:
                out['messages'][full] = listing_message(nm, source(nm['file']), missing)
        for full, e in sorted(ours['enums'].items()):
            ne = newer['enums'].get(full)
            pe = pkg['enums'].get(full)
            if ne is None:
                continue
            missing = (set(e['values']) - set(pe['values'] if pe else ())) & set(ne['values'])
            if pe is None or missing:
                out['enums'][full] = listing_enum(ne, source(ne['file']), missing)
    write_listing(args.out, out)
    log('wrote %s: %d messages, %d enums' % (args.out, len(out['messages']),
                                             len(out['enums'])))
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    sub = ap.add_subparsers(dest='cmd', required=True)
    c = sub.add_parser('check')
    c.add_argument('--proto-root', required=True)
    c.add_argument('--cache-dir', required=True)
    c.add_argument('--no-self-test', action='store_true')
    r = sub.add_parser('make-reference')
    r.add_argument('out')
    r.add_argument('specs', nargs='+')
    u = sub.add_parser('make-supplement')
    u.add_argument('out')
    u.add_argument('--proto-root', required=True)
    u.add_argument('--cache-dir', required=True)
    u.add_argument('--upstream', action='append', required=True)
    args = ap.parse_args()
    cmds = {'check': cmd_check, 'make-reference': cmd_make_reference,
            'make-supplement': cmd_make_supplement}
    try:
        return cmds[args.cmd](args)
    except Skip as e:
        log('SKIP: %s' % e)
        return EXIT_SKIP
    except Fail as e:
        log('ERROR: %s' % e)
        return 1


if __name__ == '__main__':
    sys.exit(main())
