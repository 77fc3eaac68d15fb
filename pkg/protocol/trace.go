package protocol

// HeaderTraceparent carries a request's W3C trace context
// (https://www.w3.org/TR/trace-context/#traceparent-header), optionally:
// a worker puts a valid one on its log lines about the request, on the
// Reply's headers and in its UsageRecord. An invalid one is ignored, as
// the specification asks, and the request runs as if it had none.
const HeaderTraceparent = "traceparent"

// Traceparent returns v when it is a valid W3C traceparent value, and ""
// otherwise: version (two lower-case hex digits, not ff), trace-id (32,
// not all zero), parent-id (16, not all zero) and flags (2), separated by
// dashes. Version 00 has exactly these 55 characters; a later version may
// add fields after a further dash, which are kept as sent (at most 256
// characters in all).
func Traceparent(v string) string {
	const n = 55
	if len(v) < n || len(v) > 256 || v[2] != '-' || v[35] != '-' || v[52] != '-' {
		return ""
	}
	if !lowerHex(v[0:2]) || v[0:2] == "ff" || !lowerHex(v[3:35]) || !lowerHex(v[36:52]) || !lowerHex(v[53:55]) {
		return ""
	}
	if allZero(v[3:35]) || allZero(v[36:52]) {
		return ""
	}
	if len(v) > n {
		if v[0:2] == "00" || v[n] != '-' {
			return ""
		}
		for i := n; i < len(v); i++ {
			if v[i] < 0x21 || v[i] > 0x7e { // visible ASCII only: it goes into headers and logs
				return ""
			}
		}
	}
	return v
}

func lowerHex(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !('0' <= c && c <= '9' || 'a' <= c && c <= 'f') {
			return false
		}
	}
	return true
}

func allZero(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] != '0' {
			return false
		}
	}
	return true
}
