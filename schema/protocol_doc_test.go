package schema

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/imd-dev/imd/schema/pb"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"
)

// The values of the login example in PROTOCOL.md.
const (
	docSecret  = "imd-example-secret"
	docToken   = "101.42.1893456000.969DG_jCY6JZX69Gl7LdFgglhV7rAElQfJ6VouAAHaQ"
	docExpiry  = 1893456000
	docAppCode = 101
	docUID     = 42
)

var (
	docLoginRequestHeader = Header{
		Version: Version, Flags: uint8(KindRequest), Cmd: CmdLogin, Status: StatusOK,
		AppCode: docAppCode, UID: docUID, Seq: 1, LogID: 0, BodyLen: 70,
	}
	docLoginRequest = &pb.LoginRequest{Token: docToken, DeviceId: "dev-1"}

	docLoginResponseHeader = Header{
		Version: Version, Flags: uint8(KindResponse), Cmd: CmdLogin, Status: StatusOK,
		AppCode: docAppCode, UID: docUID, Seq: 1, LogID: 12345, BodyLen: 29,
	}
	docLoginResponse = &pb.LoginResponse{
		Epoch: 1, ServerTimeMs: 1767225600000, KeepaliveMs: 30000, IdleTimeoutMs: 90000,
		GateId: "gw-1", MaxBody: 65536, Account: 1,
	}
)

func readProtocolDoc(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile("PROTOCOL.md")
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

var hexBlockRE = regexp.MustCompile("(?ms)^```hex ([a-z0-9-]+)\n(.*?)^```")

// hexBlocks returns the bytes of every ```hex <name> block. Text after '#'
// on a line is a comment; the rest must be two-digit hex bytes.
func hexBlocks(t *testing.T, doc string) map[string][]byte {
	t.Helper()
	blocks := map[string][]byte{}
	for _, m := range hexBlockRE.FindAllStringSubmatch(doc, -1) {
		name := m[1]
		if _, dup := blocks[name]; dup {
			t.Fatalf("hex block %q appears twice", name)
		}
		var out []byte
		for i, line := range strings.Split(m[2], "\n") {
			if c := strings.IndexByte(line, '#'); c >= 0 {
				line = line[:c]
			}
			for _, tok := range strings.Fields(line) {
				if len(tok) != 2 {
					t.Fatalf("block %q line %d: %q is not one hex byte", name, i+1, tok)
				}
				b, err := hex.DecodeString(tok)
				if err != nil {
					t.Fatalf("block %q line %d: %v", name, i+1, err)
				}
				out = append(out, b[0])
			}
		}
		blocks[name] = out
	}
	return blocks
}

func TestProtocolDocLoginExample(t *testing.T) {
	doc := readProtocolDoc(t)
	blocks := hexBlocks(t, doc)
	tests := []struct {
		block string
		h     Header
		want  proto.Message
		got   proto.Message
	}{
		{"login-request", docLoginRequestHeader, docLoginRequest, new(pb.LoginRequest)},
		{"login-response", docLoginResponseHeader, docLoginResponse, new(pb.LoginResponse)},
	}
	for _, tt := range tests {
		t.Run(tt.block, func(t *testing.T) {
			frame, ok := blocks[tt.block]
			if !ok {
				t.Fatalf("PROTOCOL.md has no ```hex %s block", tt.block)
			}
			h, err := ParseHeader(frame, 0)
			if err != nil {
				t.Fatalf("ParseHeader: %v", err)
			}
			if h != tt.h {
				t.Fatalf("header:\n got %+v\nwant %+v", h, tt.h)
			}
			if len(frame) != HeaderLen+int(h.BodyLen) {
				t.Fatalf("frame is %d bytes, header says %d", len(frame), HeaderLen+int(h.BodyLen))
			}
			// It also decodes through the stream decoder.
			var f Frame
			if err := NewDecoder(bytes.NewReader(frame), 0).ReadFrame(&f); err != nil || f.Header != tt.h {
				t.Fatalf("Decoder: %v %+v", err, f.Header)
			}
			f.Release()
			if err := proto.Unmarshal(frame[HeaderLen:], tt.got); err != nil {
				t.Fatalf("body: %v", err)
			}
			if !proto.Equal(tt.got, tt.want) {
				t.Fatalf("body:\n got %v\nwant %v", tt.got, tt.want)
			}
			// The documented bytes are exactly what an encoder produces.
			body, err := proto.MarshalOptions{Deterministic: true}.Marshal(tt.want)
			if err != nil {
				t.Fatal(err)
			}
			hh := tt.h
			if enc := AppendFrame(nil, &hh, body); !bytes.Equal(enc, frame) {
				t.Fatalf("encoding differs from the document:\n got % x\n doc % x", enc, frame)
			}
		})
	}
}

func TestProtocolDocToken(t *testing.T) {
	doc := readProtocolDoc(t)
	for _, s := range []string{"`" + docSecret + "`", "token = " + docToken, strconv.Itoa(docExpiry)} {
		if !strings.Contains(doc, s) {
			t.Errorf("PROTOCOL.md does not state %q", s)
		}
	}
	parts := strings.Split(docToken, ".")
	if len(parts) != 4 {
		t.Fatalf("token has %d parts", len(parts))
	}
	if parts[0] != strconv.Itoa(docAppCode) || parts[1] != strconv.Itoa(docUID) || parts[2] != strconv.Itoa(docExpiry) {
		t.Fatalf("token claims %v, want appcode %d uid %d expiry %d", parts[:3], docAppCode, docUID, docExpiry)
	}
	m := hmac.New(sha256.New, []byte(docSecret))
	fmt.Fprintf(m, "%d|%d|%d", docAppCode, docUID, docExpiry)
	want := m.Sum(nil)
	sig, err := base64.RawURLEncoding.DecodeString(parts[3])
	if err != nil {
		t.Fatalf("signature is not unpadded base64url: %v", err)
	}
	if !hmac.Equal(sig, want) {
		t.Fatalf("signature %s is wrong for secret %q; want %s", parts[3], docSecret, base64.RawURLEncoding.EncodeToString(want))
	}
	if len(parts[3]) != 43 {
		t.Fatalf("signature is %d characters, the document says 43", len(parts[3]))
	}
}

// section returns the text of the "## <title>" section of doc, up to the
// next second-level heading.
func section(t *testing.T, doc, title string) string {
	t.Helper()
	i := strings.Index(doc, "\n## "+title+"\n")
	if i < 0 {
		t.Fatalf("PROTOCOL.md has no section %q", title)
	}
	rest := doc[i+1:]
	if j := strings.Index(rest[3:], "\n## "); j >= 0 {
		rest = rest[:j+3]
	}
	return rest
}

// tableRows returns the cells of every markdown table row whose first cell
// matches first.
func tableRows(doc string, first *regexp.Regexp) [][]string {
	var rows [][]string
	for _, line := range strings.Split(doc, "\n") {
		line = strings.TrimSpace(line)
		if !strings.HasPrefix(line, "|") || !strings.HasSuffix(line, "|") {
			continue
		}
		cells := strings.Split(line[1:len(line)-1], "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		if first.MatchString(cells[0]) {
			rows = append(rows, cells)
		}
	}
	return rows
}

func TestProtocolDocCommandTable(t *testing.T) {
	doc := readProtocolDoc(t)
	rows := tableRows(section(t, doc, "Commands"), regexp.MustCompile("^`0x[0-9a-f]{4}`$"))
	byCmd := map[Cmd][]string{}
	for _, r := range rows {
		n, err := strconv.ParseUint(strings.Trim(r[0], "`")[2:], 16, 16)
		if err != nil {
			t.Fatal(err)
		}
		c := Cmd(n)
		if !c.Known() {
			t.Errorf("PROTOCOL.md lists %s, which is not in cmd.go", r[0])
		}
		if _, dup := byCmd[c]; dup {
			t.Errorf("PROTOCOL.md lists %s twice", r[0])
		}
		byCmd[c] = r
	}
	for _, c := range Cmds() {
		r, ok := byCmd[c]
		if !ok {
			t.Errorf("command %#04x %s is missing from PROTOCOL.md", uint16(c), c)
			continue
		}
		if len(r) != 6 {
			t.Errorf("%s: row has %d cells, want 6", c, len(r))
			continue
		}
		if r[1] != c.String() {
			t.Errorf("%#04x: name %q, cmd.go says %q", uint16(c), r[1], c.String())
		}
		if r[3] != "request" && r[3] != "notify" {
			t.Errorf("%s: kind %q", c, r[3])
		}
		// Every message the row names exists in imd.proto, and requests
		// name a request and a response body.
		msgs := regexp.MustCompile("`([A-Z][A-Za-z0-9]*)`").FindAllStringSubmatch(r[4], -1)
		if (r[3] == "request" && len(msgs) != 2) || (r[3] == "notify" && len(msgs) != 1) {
			t.Errorf("%s: bodies %q do not fit kind %s", c, r[4], r[3])
		}
		for _, m := range msgs {
			d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName("imd.v1." + m[1]))
			if err != nil {
				t.Errorf("%s: message %s is not in imd.proto", c, m[1])
				continue
			}
			if _, ok := d.(protoreflect.MessageDescriptor); !ok {
				t.Errorf("%s: %s is not a message", c, m[1])
			}
		}
	}
}

func TestProtocolDocStatusTable(t *testing.T) {
	doc := readProtocolDoc(t)
	rows := tableRows(section(t, doc, "Status codes"), regexp.MustCompile(`^[0-9]+$`))
	byStatus := map[Status][]string{}
	for _, r := range rows {
		n, err := strconv.ParseUint(r[0], 10, 16)
		if err != nil {
			t.Fatal(err)
		}
		s := Status(n)
		if _, ok := statusNames[s]; !ok {
			t.Errorf("PROTOCOL.md lists status %d, which is not in status.go", n)
		}
		if _, dup := byStatus[s]; dup {
			t.Errorf("PROTOCOL.md lists status %d twice", n)
		}
		byStatus[s] = r
	}
	yesNo := func(b bool) string {
		if b {
			return "yes"
		}
		return "no"
	}
	for _, s := range Statuses() {
		r, ok := byStatus[s]
		if !ok {
			t.Errorf("status %d (%s) is missing from PROTOCOL.md", s, s)
			continue
		}
		if len(r) != 5 {
			t.Errorf("status %d: row has %d cells, want 5", s, len(r))
			continue
		}
		if r[1] != s.String() {
			t.Errorf("status %d: name %q, status.go says %q", s, r[1], s.String())
		}
		if r[2] != yesNo(s.Retryable()) {
			t.Errorf("status %d: retryable %q, Retryable() = %v", s, r[2], s.Retryable())
		}
		if r[3] != yesNo(s.Fatal()) {
			t.Errorf("status %d: fatal %q, Fatal() = %v", s, r[3], s.Fatal())
		}
	}
}

func TestProtocolDocRPCTable(t *testing.T) {
	doc := readProtocolDoc(t)
	rows := tableRows(section(t, doc, "Internal RPC"), regexp.MustCompile("^`0x7f[0-9a-f]{2}`$"))
	seen := map[Cmd]bool{}
	for _, r := range rows {
		n, err := strconv.ParseUint(strings.Trim(r[0], "`")[2:], 16, 16)
		if err != nil {
			t.Fatal(err)
		}
		c := Cmd(n)
		if !c.IsRPC() || c.Known() {
			t.Errorf("PROTOCOL.md lists %s, which is not in rpc.go's table (or is a client command)", r[0])
		}
		seen[c] = true
		if len(r) != 6 {
			t.Errorf("%s: row has %d cells, want 6", c, len(r))
			continue
		}
		if r[1] != c.String() {
			t.Errorf("%#04x: name %q, rpc.go says %q", uint16(c), r[1], c.String())
		}
		msgs := regexp.MustCompile("`([A-Z][A-Za-z0-9]*)`").FindAllStringSubmatch(r[4], -1)
		if (r[3] == "request" && len(msgs) != 2) || (r[3] == "notify" && len(msgs) != 1) || (r[3] != "request" && r[3] != "notify") {
			t.Errorf("%s: bodies %q do not fit kind %q", c, r[4], r[3])
		}
		for _, m := range msgs {
			if _, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName("imd.v1." + m[1])); err != nil {
				t.Errorf("%s: message %s is not in the protos", c, m[1])
			}
		}
	}
	for _, c := range RPCCmds() {
		if !seen[c] {
			t.Errorf("internal command %#04x %s is missing from PROTOCOL.md", uint16(c), c)
		}
	}
}
