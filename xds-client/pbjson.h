/*
 * Descriptor-driven codec between json-c objects and protobuf-c messages, following protobuf's
 * canonical JSON mapping (https://protobuf.dev/programming-guides/proto3/#json):
 *
 *   - field names: the lowerCamel json_name or the original proto name are both accepted;
 *     output uses the original proto names (as Envoy's config_dump does);
 *   - enums by name or number; int64/uint64 as JSON string or number (output: string);
 *     every numeric type also accepts a string ("15008"); floats accept "NaN"/"Infinity";
 *   - bytes as base64 (standard or URL-safe, padding optional; output: standard, padded);
 *   - maps as JSON objects; null means "field not set";
 *   - well-known types: google.protobuf.Any ("@type" + fields, or "@type" + "value" for
 *     well-known inner types), Duration ("1.5s"), Struct/Value/ListValue as plain JSON,
 *     wrappers (StringValue, UInt32Value, ...) as bare values, Empty as {}.
 *
 * Any is resolved through a registry of every message type compiled into xdsproto (type URL
 * "type.googleapis.com/<full name>"). On decode the inner JSON is decoded into its message and
 * packed into Any.value; on encode Any.value is unpacked and expanded with "@type".
 *
 * Errors: functions return -errno and set *reterr_desc to a description naming the JSON path
 * of the offending value, e.g.
 *   "resources[3].filter_chains[0].filters[1].typed_config: unknown type URL
 * type.googleapis.com/x.Y". The description lives in a thread-local buffer valid until the next
 * call into this module (or resources.c) on the same thread.
 *
 * Memory: decoded messages are allocated through waypoint/base/alloc.h (so failalloc tests
 * reach every path) and must be released with xds_pbjson_message_free(). json-c objects are
 * reference counted as usual (json_object_put).
 */
#ifndef XDS_PBJSON_H
#define XDS_PBJSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <json-c/json.h>
#include <protobuf-c/protobuf-c.h>

#include "xdsproto.h"

/* Decode flags. */
#define XDS_PBJSON_IGNORE_UNKNOWN (1u << 0) /* skip unknown fields instead of failing (lenient) */

/* Encode flags. */
#define XDS_PBJSON_ENCODE_DEFAULTS (1u << 1) /* also emit proto3 scalars at their default value */

/* Limits on input the peer or a file controls. */
#define XDS_PBJSON_MAX_DEPTH      64          /* nested messages (and JSON values inside Struct) */
#define XDS_PBJSON_MAX_STRING     (1u << 20)  /* bytes in one string / bytes field (decoded) */
#define XDS_PBJSON_MAX_TEXT       (64u << 20) /* JSON or YAML text handed to the parsers */
#define XDS_PBJSON_MAX_TEXT_DEPTH 128         /* nesting of JSON/YAML arrays and objects */

/* The protobuf-c allocator that routes through wp_malloc/wp_free. Use it to unpack messages
 * that are later freed with xds_pbjson_message_free(). */
extern ProtobufCAllocator xds_pb_allocator;

/*
 * Decodes obj (a JSON object, or for well-known types the JSON form of that type) into a new
 * message of type desc. path_prefix (may be NULL or "") is prepended to paths in error
 * descriptions. flags: XDS_PBJSON_IGNORE_UNKNOWN.
 * On success stores the message in *ret (free with xds_pbjson_message_free) and returns 0.
 * Returns -EINVAL on bad input (unknown field, wrong JSON type, out-of-range number, bad enum,
 * bad duration/base64, unknown or missing "@type", two members of one oneof, duplicate field),
 * -E2BIG when a limit is exceeded, -ENOMEM on allocation failure.
 */
int xds_pbjson_decode(const ProtobufCMessageDescriptor *desc, struct json_object *obj,
                      unsigned flags, const char *path_prefix, ProtobufCMessage **ret,
                      const char **reterr_desc);

/*
 * Encodes msg into a new json-c value (*ret, caller owns one reference). Well-known types use
 * their special JSON forms, Any is expanded with "@type". flags: XDS_PBJSON_ENCODE_DEFAULTS.
 * Returns 0, -EINVAL when an Any holds an unknown type URL or bytes that do not unpack,
 * -E2BIG past XDS_PBJSON_MAX_DEPTH, -ENOMEM.
 */
int xds_pbjson_encode(const ProtobufCMessage *msg, unsigned flags, struct json_object **ret,
                      const char **reterr_desc);

/* Frees a message from xds_pbjson_decode, xds_any_unpack or protobuf_c_message_unpack with
 * xds_pb_allocator. NULL-safe; returns NULL. */
ProtobufCMessage *xds_pbjson_message_free(ProtobufCMessage *msg);

/*
 * Parses JSON text (len bytes, need not be NUL-terminated) into *ret. Nesting is limited to
 * XDS_PBJSON_MAX_TEXT_DEPTH and size to XDS_PBJSON_MAX_TEXT. Trailing non-space data is an error.
 * Returns 0, -EINVAL (syntax error, with line/offset in *reterr_desc), -E2BIG, -ENOMEM.
 */
int xds_json_parse(const char *text, size_t len, struct json_object **ret,
                   const char **reterr_desc);

/*
 * Parses one YAML document into json-c values. Quoted scalars become strings; plain scalars
 * follow the YAML 1.2 core schema (null, true/false, integers incl. 0x/0o, floats incl. .inf/.nan,
 * else string); "!!str" forces a string. Anchors/aliases, non-scalar keys, duplicate keys and
 * more than one document are rejected. Same limits and returns as xds_json_parse.
 */
int xds_yaml_parse(const char *text, size_t len, struct json_object **ret,
                   const char **reterr_desc);

/* Looks up a compiled message type by full name ("envoy.config.listener.v3.Listener").
 * Returns NULL when unknown. */
const ProtobufCMessageDescriptor *xds_registry_lookup_name(const char *full_name);

/* Looks up a compiled message type by type URL: the part after the last '/' is the full name
 * ("type.googleapis.com/envoy.config.listener.v3.Listener"). Returns NULL when unknown. */
const ProtobufCMessageDescriptor *xds_registry_lookup(const char *type_url);

/*
 * Unpacks an Any. When expect is non-NULL the Any's type URL must name exactly that type
 * (-EINVAL otherwise); when NULL the type is looked up in the registry (-EINVAL when unknown).
 * On success stores a new message in *ret (free with xds_pbjson_message_free) and returns 0;
 * -EINVAL when the bytes do not parse, -ENOMEM.
 */
int xds_any_unpack(const Google__Protobuf__Any *any, const ProtobufCMessageDescriptor *expect,
                   ProtobufCMessage **ret, const char **reterr_desc);

/* Same for a bare serialized message of type desc. */
int xds_pb_unpack(const ProtobufCMessageDescriptor *desc, const uint8_t *data, size_t len,
                  ProtobufCMessage **ret, const char **reterr_desc);

/* Builds a type URL for desc into buf ("type.googleapis.com/" + full name). Returns the length
 * written, or -ENOSPC when cap is too small. */
int xds_type_url(const ProtobufCMessageDescriptor *desc, char *buf, size_t cap);

#endif
