package protocol_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/isode-run/isode/pkg/protocol"
)

func TestValidateReplyTo(t *testing.T) {
	tests := []struct {
		name string
		give string
		ok   bool
	}{
		{"inbox", "_INBOX.abc.def", true},
		{"plain", "replies.acme", true},
		{"at the limit", "_INBOX." + strings.Repeat("x", protocol.MaxReplySubjectBytes-7), true},
		{"over the limit", "_INBOX." + strings.Repeat("x", protocol.MaxReplySubjectBytes-6), false},
		{"empty", "", false},
		{"wildcard", "_INBOX.*", false},
		{"full wildcard", "_INBOX.>", false},
		{"wildcard inside a token is a plain byte", "_INBOX.a*b", true},
		{"empty token", "_INBOX..a", false},
		{"leading dot", ".a", false},
		{"trailing dot", "a.", false},
		{"space", "a b", false},
		{"tab", "a\tb", false},
		{"CRLF", "a\r\nPUB x 1", false},
		{"non-ASCII", "a.\u00e9", false},
		{"JetStream API", "$JS.API.STREAM.DELETE.ISODE", false},
		{"system", "$SYS.REQ", false},
		{"worker inbox", protocol.WorkerInboxPrefix + ".x", false},
		{"confirmation", protocol.ReplyAckPrefix + ".x.y", false},
		{"fleet request", "isode.run.1", false},
		{"fleet itself", "isode", false},
		{"another prefix", "isodex.run.1", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := protocol.ValidateReplyTo(tt.give, "isode")
			if (err == nil) != tt.ok {
				t.Fatalf("ValidateReplyTo(%q) = %v, want ok=%v", tt.give, err, tt.ok)
			}
			if err != nil && !errors.Is(err, protocol.ErrBadRequest) {
				t.Errorf("error %v is not bad_request", err)
			}
		})
	}
}

func TestValidateRequestID(t *testing.T) {
	for give, ok := range map[string]bool{
		"a":          true,
		"4f1c-uuid":  true,
		"":           false,
		"with space": false,
		"crlf\r\n":   false,
		strings.Repeat("i", protocol.MaxRequestIDBytes):   true,
		strings.Repeat("i", protocol.MaxRequestIDBytes+1): false,
	} {
		if err := protocol.ValidateRequestID(give); (err == nil) != ok {
			t.Errorf("ValidateRequestID(%.20q) = %v, want ok=%v", give, err, ok)
		}
	}
}

func TestParseDeadline(t *testing.T) {
	tests := []struct {
		give    string
		want    time.Time
		wantErr bool
	}{
		{"", time.Time{}, false},
		{"1700000000000", time.UnixMilli(1700000000000), false},
		{"253402300799999", time.UnixMilli(253402300799999), false},
		{"253402300800000", time.Time{}, true},
		{"0", time.Time{}, true},
		{"-1", time.Time{}, true},
		{"1e12", time.Time{}, true},
		{"soon", time.Time{}, true},
		{strings.Repeat("9", 100), time.Time{}, true},
	}
	for _, tt := range tests {
		got, err := protocol.ParseDeadline(tt.give)
		if (err != nil) != tt.wantErr || !got.Equal(tt.want) {
			t.Errorf("ParseDeadline(%.20q) = %v, %v; want %v, err %v", tt.give, got, err, tt.want, tt.wantErr)
		}
		if err != nil && (!errors.Is(err, protocol.ErrBadRequest) || len(err.Error()) > 200) {
			t.Errorf("ParseDeadline(%.20q): error %q", tt.give, err)
		}
	}
}

// FuzzHeaders: the validators of every header value a worker uses never
// panic, and what they accept is safe to use as a subject, an id, a time.
func FuzzHeaders(f *testing.F) {
	for _, s := range []string{"_INBOX.a.b", "", "*", ">", "a..b", "$JS.API.X", "isode.run.1", "_ISODE_ACK.a",
		"a\r\nb", "\x00", strings.Repeat("x", 600), "1700000000000", "-1", "9999999999999999999", "\xff\xfe"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if err := protocol.ValidateReplyTo(s, "isode"); err == nil {
			if protocol.ValidateSubject(s, protocol.MaxReplySubjectBytes) != nil || strings.HasPrefix(s, "$") ||
				strings.HasPrefix(s, "isode.") || strings.ContainsAny(s, " \t\r\n") {
				t.Fatalf("accepted reply subject %q", s)
			}
			for _, tok := range strings.Split(s, ".") {
				if tok == "" || tok == "*" || tok == ">" {
					t.Fatalf("accepted reply subject %q with token %q", s, tok)
				}
			}
		} else if !errors.Is(err, protocol.ErrBadRequest) {
			t.Fatalf("error %v is not bad_request", err)
		}
		if protocol.ValidateRequestID(s) == nil && (len(s) == 0 || len(s) > protocol.MaxRequestIDBytes || strings.ContainsAny(s, " \r\n\x00")) {
			t.Fatalf("accepted id %q", s)
		}
		if d, err := protocol.ParseDeadline(s); err == nil && s != "" && (d.UnixMilli() <= 0 || d.Year() > 9999) {
			t.Fatalf("accepted deadline %q as %v", s, d)
		}
	})
}
