package protocol

import (
	"slices"
	"testing"
)

func TestParseStreamSubject(t *testing.T) {
	for _, tt := range []struct {
		subject string
		want    Route
		ok      bool
	}{
		{"isode.run.7", Route{App: DefaultApplication, Shard: 7}, true},
		{"isode.app.app-a.run.7", Route{App: "app-a", Shard: 7}, true},
		{"isode.app.shop_42.called.63", Route{App: "shop_42", Shard: 63, Called: true}, true},
		{"isode.app.default.run.7", Route{}, false}, // reserved name
		{"isode.app.a|b.run.7", Route{}, false},
		{"isode.app.app-a.run.07", Route{}, false},
		{"isode.app.app-a.run.-1", Route{}, false},
		{"isode.app.app-a.ran.7", Route{}, false},
		{"isode.app.app-a.run", Route{}, false},
		{"isode.app..run.7", Route{}, false},
		{"other.app.app-a.run.7", Route{}, false},
		{"isode.reply.app-a._INBOX.x", Route{}, false},
	} {
		got, ok := ParseStreamSubject("isode", tt.subject)
		if ok != tt.ok || got != tt.want {
			t.Errorf("ParseStreamSubject(%q) = %+v, %v; want %+v, %v", tt.subject, got, ok, tt.want, tt.ok)
		}
	}
	// Every subject the builders make parses back, and is in a filter.
	for _, s := range []string{AppRunSubject("isode", "app-a", 5), CalledSubject("isode", "app-a", 5), RunSubject("isode", 5)} {
		r, ok := ParseStreamSubject("isode", s)
		if !ok || r.Shard != 5 {
			t.Errorf("%s: %+v %v", s, r, ok)
		}
	}
	if f := ShardFilters("isode", 5); len(f) != 3 || !slices.Contains(f, "isode.app.*.run.5") {
		t.Errorf("filters %q", f)
	}
}

func TestTenantKey(t *testing.T) {
	if k := TenantKey(DefaultApplication, "tenant1"); k != "tenant1" {
		t.Errorf("implicit application: %q", k)
	}
	a, b := TenantKey("app-a", "tenant1"), TenantKey("app-b", "tenant1")
	if a == b || a == "tenant1" {
		t.Errorf("two applications' tenant1: %q, %q", a, b)
	}
	for _, k := range []string{a, b, "tenant1"} {
		app, key := SplitTenantKey(k)
		if TenantKey(app, key) != k || key != "tenant1" {
			t.Errorf("split %q: %q %q", k, app, key)
		}
		if err := ValidateTenantKey(k); err != nil {
			t.Errorf("%q: %v", k, err)
		}
	}
	for _, k := range []string{"default|x", "a|", "|x", "a b|x", "a|b|c"} {
		if ValidateTenantKey(k) == nil {
			t.Errorf("%q passed", k)
		}
	}
}

func TestValidateApplication(t *testing.T) {
	for _, ok := range []string{"app-a", "A_1", "x"} {
		if err := ValidateApplication(ok); err != nil {
			t.Errorf("%q: %v", ok, err)
		}
	}
	for _, bad := range []string{"", "default", "a.b", "a*", "a>", "a|b", "a b", string(make([]byte, 65))} {
		if ValidateApplication(bad) == nil {
			t.Errorf("%q passed", bad)
		}
	}
}

func TestParseCallSubject(t *testing.T) {
	for _, tt := range []struct {
		subject, app string
		ok           bool
	}{
		{"isode.call", DefaultApplication, true},
		{"isode.app.app-b.call", "app-b", true},
		{"isode.app.default.call", "", false},
		{"isode.app.a.b.call", "", false},
		{"isode.app..call", "", false},
		{"isode.app.app-b.run.1", "", false},
		{"other.call", "", false},
	} {
		app, ok := ParseCallSubject("isode", tt.subject)
		if app != tt.app || ok != tt.ok {
			t.Errorf("ParseCallSubject(%q) = %q, %v; want %q, %v", tt.subject, app, ok, tt.app, tt.ok)
		}
	}
	if app, ok := ParseCallSubject("isode", AppCallSubject("isode", "shop_42")); !ok || app != "shop_42" {
		t.Errorf("round trip: %q %v", app, ok)
	}
}
