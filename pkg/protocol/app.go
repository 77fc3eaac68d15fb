package protocol

import (
	"strconv"
	"strings"
)

// Applications. Several applications may share one fleet, each a NATS
// account of its own. An application publishes exactly as a single
// application does (RunSubject, CallSubject, its own _INBOX.> for replies);
// the service import that carries its requests into the fleet's account
// maps them to subjects that name the application (AppRunSubject,
// AppCallSubject). The name is the importing account's, checked by the
// server (the export's account_token_position), so no publisher can forge
// it, and the worker takes it from the subject a request arrives on, never
// from a header or the body. deploy/auth.conf has the stanzas.
//
// A request that arrives on RunSubject itself belongs to the implicit
// application (DefaultApplication): a deployment without application
// accounts, such as the embedded single-machine server, is one application.

// DefaultApplication names the implicit application of requests published
// straight into the fleet's account (RunSubject, CallSubject).
const DefaultApplication = "default"

// MaxApplicationBytes bounds an application's name.
const MaxApplicationBytes = 64

// ValidateApplication checks an application's name: 1 to
// MaxApplicationBytes of ASCII letters, digits, '-' and '_' (a NATS account
// name that is also one subject token), and not DefaultApplication, which
// names the implicit application only.
func ValidateApplication(name string) error {
	if name == "" || len(name) > MaxApplicationBytes {
		return Errorf(CodeBadRequest, "application name is %d bytes, want 1 to %d", len(name), MaxApplicationBytes)
	}
	if name == DefaultApplication {
		return Errorf(CodeBadRequest, "application name %q is reserved for requests published into the fleet's own account", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		switch {
		case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9', c == '-', c == '_':
		default:
			return Errorf(CodeBadRequest, "application name has a character that is not allowed (%q at byte %d): use letters, digits, - and _", c, i)
		}
	}
	return nil
}

// AppRunSubject is the subject, in the fleet's account, of app's requests
// for a shard: "<prefix>.app.<app>.run.<shard>". An application publishes
// RunSubject; its import maps it here.
func AppRunSubject(prefix, app string, shard int) string {
	return prefix + ".app." + app + ".run." + strconv.Itoa(shard)
}

// AppCallSubject is the subject, in the fleet's account, of app's plain
// request/reply calls: "<prefix>.app.<app>.call". An application sends
// CallSubject; its import maps it here.
func AppCallSubject(prefix, app string) string { return prefix + ".app." + app + ".call" }

// AppCallWildcard covers every application's calls.
func AppCallWildcard(prefix string) string { return prefix + ".app.*.call" }

// CalledSubject is where a worker stores a call of app taken on its
// AppCallSubject: "<prefix>.app.<app>.called.<shard>". Only workers publish
// there (it is not exported), so a request stored there is known to carry
// a reply subject the server made for the call (a service import's
// response subject), which the worker answers as it is.
func CalledSubject(prefix, app string, shard int) string {
	return prefix + ".app." + app + ".called." + strconv.Itoa(shard)
}

// ReplySubject is the subject, in the fleet's account, a worker publishes
// app's reply to: "<prefix>.reply.<app>.<replyTo>". The fleet exports it
// as a stream to that application's account alone, whose import maps it
// back to replyTo (its own _INBOX.>); so a reply can only ever reach the
// application that asked, whatever HeaderReplyTo says.
func ReplySubject(prefix, app, replyTo string) string {
	return prefix + ".reply." + app + "." + replyTo
}

// StreamSubjects are the subjects of the request stream: the implicit
// application's shards, the applications' shards and their calls.
func StreamSubjects(prefix string) []string {
	return []string{RunWildcard(prefix), prefix + ".app.*.run.*", prefix + ".app.*.called.*"}
}

// ShardFilters are the subjects of one shard in the request stream, for
// every application: a shard's consumer filters on them.
func ShardFilters(prefix string, shard int) []string {
	n := strconv.Itoa(shard)
	return []string{RunSubject(prefix, shard), prefix + ".app.*.run." + n, prefix + ".app.*.called." + n}
}

// Route is what the subject of a stored request says about it.
type Route struct {
	// App is the application that sent it (DefaultApplication for
	// RunSubject).
	App string
	// Shard is the shard it was published to.
	Shard int
	// Called is true for a call stored by a worker (CalledSubject): its
	// HeaderReplyTo is answered as it is, not under ReplySubject.
	Called bool
}

// ParseStreamSubject reads a request stream subject (one of
// StreamSubjects). It returns false for any other subject or an invalid
// application name.
func ParseStreamSubject(prefix, subject string) (Route, bool) {
	if shard, ok := ParseRunSubject(prefix, subject); ok {
		return Route{App: DefaultApplication, Shard: shard}, true
	}
	rest, ok := strings.CutPrefix(subject, prefix+".app.")
	if !ok {
		return Route{}, false
	}
	app, rest, ok := strings.Cut(rest, ".")
	if !ok || ValidateApplication(app) != nil {
		return Route{}, false
	}
	kind, num, ok := strings.Cut(rest, ".")
	if !ok || (kind != "run" && kind != "called") {
		return Route{}, false
	}
	shard, ok := ParseRunSubject(prefix, prefix+".run."+num)
	if !ok {
		return Route{}, false
	}
	return Route{App: app, Shard: shard, Called: kind == "called"}, true
}

// ParseCallSubject reads the subject a call arrived on: CallSubject is the
// implicit application's, AppCallSubject an application's. It returns
// false for any other subject or an invalid application name.
func ParseCallSubject(prefix, subject string) (app string, ok bool) {
	if subject == CallSubject(prefix) {
		return DefaultApplication, true
	}
	rest, ok := strings.CutPrefix(subject, prefix+".app.")
	if !ok {
		return "", false
	}
	app, ok = strings.CutSuffix(rest, ".call")
	if !ok || ValidateApplication(app) != nil {
		return "", false
	}
	return app, true
}

// TenantKey is a tenant's identity inside a fleet: the isolate key within
// its application. The implicit application's tenants keep their isolate
// key as it is; another application's are "<app>|<key>" ('|' is in
// neither an application's name nor an isolate key, so two applications'
// equal keys never meet). An empty app is the implicit application.
func TenantKey(app, isolateKey string) string {
	if app == DefaultApplication || app == "" {
		return isolateKey
	}
	return app + "|" + isolateKey
}

// SplitTenantKey returns the application and isolate key of a TenantKey.
func SplitTenantKey(key string) (app, isolateKey string) {
	if a, k, ok := strings.Cut(key, "|"); ok {
		return a, k
	}
	return DefaultApplication, key
}

// ValidateTenantKey checks a TenantKey: a valid isolate key, with a valid
// application name before a '|' when it has one.
func ValidateTenantKey(key string) error {
	if a, k, ok := strings.Cut(key, "|"); ok {
		if err := ValidateApplication(a); err != nil {
			return err
		}
		return ValidateIsolateKey(k)
	}
	return ValidateIsolateKey(key)
}
