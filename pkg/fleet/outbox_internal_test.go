package fleet

import (
	"strings"
	"testing"
	"unicode/utf8"
)

// FuzzHeaderValue: whatever a header value holds (a snippet's error
// message, a request's id), what the worker sends is one line of at most
// maxHeaderValueBytes, and a clean value is sent as it is.
func FuzzHeaderValue(f *testing.F) {
	for _, s := range []string{"", "ok", "a\r\nIsode-Error-Code: x\r\n\r\n", "\x00\x7f", strings.Repeat("é", 600), "\xff\xfe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v := headerValue(s)
		if len(v) > maxHeaderValueBytes {
			t.Fatalf("%d bytes", len(v))
		}
		for i := 0; i < len(v); i++ {
			if v[i] < ' ' || v[i] == 0x7f {
				t.Fatalf("control byte %#x at %d in %q", v[i], i, v)
			}
		}
		if utf8.ValidString(s) && !utf8.ValidString(v) {
			t.Fatalf("cut %q inside a rune", s)
		}
		clean := !strings.ContainsFunc(s, func(r rune) bool { return r < ' ' || r == 0x7f })
		if clean && len(s) <= maxHeaderValueBytes && v != s {
			t.Fatalf("clean value %q changed to %q", s, v)
		}
	})
}
