package platform

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
	"gopkg.in/yaml.v3"
)

// pushes collects what OnS2C delivered.
type pushes struct {
	mu sync.Mutex
	ns []*pb.S2CNotify
}

func (p *pushes) on(n *pb.S2CNotify) {
	p.mu.Lock()
	p.ns = append(p.ns, n)
	p.mu.Unlock()
}

func (p *pushes) len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.ns)
}

func driver(t *testing.T, p *Platform, appcode uint32, uid uint64, ps *pushes) *sdk.Client {
	t.Helper()
	return login(t, p, appcode, uid, func(o *sdk.Options) { o.OnS2C = ps.on })
}

// api calls the HTTP API with key and decodes the JSON answer into out.
func api(t testing.TB, p *Platform, method, path, key string, body any, out any) int {
	t.Helper()
	var rd io.Reader
	switch b := body.(type) {
	case nil:
	case string:
		rd = strings.NewReader(b)
	case []byte:
		rd = bytes.NewReader(b)
	default:
		raw, err := json.Marshal(b)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequest(method, "http://"+p.HTTPAddr()+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if !strings.HasPrefix(resp.Header.Get("Content-Type"), "application/json") {
		t.Fatalf("%s %s: content type %q, body %q", method, path, resp.Header.Get("Content-Type"), raw)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %v in %q", method, path, err, raw)
		}
	}
	return resp.StatusCode
}

type pushResult struct {
	PushID  string `json:"push_id"`
	Online  int    `json:"online"`
	Stored  int    `json:"stored"`
	Dropped int    `json:"dropped"`
	Results []struct {
		AppCode uint32 `json:"appcode"`
		UID     uint64 `json:"uid"`
		Online  bool   `json:"online"`
		Pushed  int    `json:"pushed"`
		Stored  bool   `json:"stored"`
		Dropped bool   `json:"dropped"`
	} `json:"results"`
}

type pushStats struct {
	Recipients, Online, Stored, Dropped, Acked int
}

// TestS2CFanOut: one call pushes an order to 50 drivers: the online ones
// get it at once, offline ones either find it at their next login (store)
// or not at all (drop), and the arrival statistics add up.
func TestS2CFanOut(t *testing.T) {
	p := start(t, nil)
	const online, offline = 30, 20
	got := make([]*pushes, online)
	for i := range online {
		got[i] = &pushes{}
		driver(t, p, 101, uint64(1+i), got[i])
	}
	var to []map[string]any
	for i := range online + offline {
		to = append(to, map[string]any{"appcode": 101, "uid": 1 + i})
	}
	var res pushResult
	code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": to, "msgtype": 3, "text": "order 77 near you", "store_offline": true}, &res)
	if code != 200 || res.Online != online || res.Stored != offline || res.Dropped != 0 || len(res.Results) != online+offline {
		t.Fatalf("push: %d %+v", code, res)
	}
	for i, r := range res.Results {
		if r.UID != uint64(1+i) || r.Online != (i < online) || r.Stored != (i >= online) || (r.Online && r.Pushed != 1) {
			t.Fatalf("result %d: %+v", i, r)
		}
	}
	for i, g := range got {
		eventually(t, 5*time.Second, fmt.Sprintf("driver %d got the order", i), func() bool { return g.len() == 1 })
		n := g.ns[0]
		if fmt.Sprint(n.PushId) != res.PushID || string(n.Content) != "order 77 near you" || n.Msgtype != 3 {
			t.Fatalf("driver %d got %+v", i, n)
		}
	}
	// Ten offline drivers come online and find the order in their inbox.
	late := make([]*pushes, 10)
	for i := range late {
		late[i] = &pushes{}
		driver(t, p, 101, uint64(online+1+i), late[i])
	}
	for i, g := range late {
		eventually(t, 5*time.Second, fmt.Sprintf("late driver %d got the order", i), func() bool { return g.len() == 1 })
		if fmt.Sprint(g.ns[0].PushId) != res.PushID || string(g.ns[0].Content) != "order 77 near you" {
			t.Fatalf("late driver %d got %+v", i, g.ns[0])
		}
	}
	var st pushStats
	deadline := time.Now().Add(5 * time.Second)
	for {
		api(t, p, "GET", "/v1/push/"+res.PushID, testAPIKey, nil, &st)
		if st.Acked == online+10 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("acks: stats %+v, want %d acked", st, online+10)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if st.Recipients != online+offline || st.Online != online || st.Stored != offline || st.Dropped != 0 {
		t.Fatalf("stats %+v", st)
	}

	// Drop mode: offline recipients miss it, and never see it later.
	var res2 pushResult
	code = api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{
		"to": []map[string]any{{"appcode": 101, "uid": 1}, {"appcode": 101, "uid": 500}}, "content": []byte("flash")}, &res2)
	if code != 200 || res2.Online != 1 || res2.Dropped != 1 || res2.Stored != 0 || !res2.Results[1].Dropped {
		t.Fatalf("drop push: %d %+v", code, res2)
	}
	var latecomer pushes
	c := driver(t, p, 101, 500, &latecomer)
	if n := inboxCount(t, c); n != 0 {
		t.Fatalf("a dropped push is in the inbox (%d)", n)
	}
	eventually(t, 5*time.Second, "uid 1 got the flash push", func() bool { return got[0].len() == 2 })
	if string(got[0].ns[1].Content) != "flash" || latecomer.len() != 0 {
		t.Fatalf("flash: %q, latecomer %d", got[0].ns[1].Content, latecomer.len())
	}
}

// TestPresence: which terminals a user is online on.
func TestPresence(t *testing.T) {
	p := start(t, nil)
	login(t, p, 101, 7, func(o *sdk.Options) { o.DeviceID = "phone" })
	login(t, p, 102, 7, func(o *sdk.Options) { o.DeviceID = "pc" })
	var pr struct {
		Online   bool `json:"online"`
		Sessions []struct {
			AppCode  uint32 `json:"appcode"`
			Terminal string `json:"terminal"`
			DeviceID string `json:"device_id"`
		} `json:"sessions"`
	}
	if code := api(t, p, "GET", "/v1/presence?uid=7", testAPIKey, nil, &pr); code != 200 || !pr.Online || len(pr.Sessions) != 2 {
		t.Fatalf("presence: %d %+v", code, pr)
	}
	apps := map[string]bool{}
	for _, s := range pr.Sessions {
		apps[fmt.Sprint(s.AppCode, s.Terminal, s.DeviceID)] = true
	}
	if !apps["101freight-androidphone"] || !apps["102freight-pcpc"] {
		t.Fatalf("sessions %+v", pr.Sessions)
	}
	if code := api(t, p, "GET", "/v1/presence?uid=8", testAPIKey, nil, &pr); code != 200 || pr.Online || len(pr.Sessions) != 0 {
		t.Fatalf("presence of an offline user: %d %+v", code, pr)
	}
	// Another account system's key sees another user 7.
	if code := api(t, p, "GET", "/v1/presence?uid=7", testAPIKey2, nil, &pr); code != 200 || pr.Online {
		t.Fatalf("presence across account systems: %d %+v", code, pr)
	}
}

// TestS2CBadRequests: each gets a clear 4xx and pushes nothing.
func TestS2CBadRequests(t *testing.T) {
	p := start(t, func(c *config.Config) { c.S2C.MaxRecipients = 5; c.S2C.MaxBody = 4096 })
	var got pushes
	driver(t, p, 101, 1, &got)
	one := []map[string]any{{"appcode": 101, "uid": 1}}
	cases := []struct {
		name   string
		key    string
		method string
		path   string
		body   any
		code   int
		status int
	}{
		{"no key", "", "POST", "/v1/push", map[string]any{"to": one, "text": "x"}, 401, 0},
		{"wrong key", "nope-nope-nope-nope", "POST", "/v1/push", map[string]any{"to": one, "text": "x"}, 401, 0},
		{"bad JSON", testAPIKey, "POST", "/v1/push", `{"to": [`, 400, 1004},
		{"unknown field", testAPIKey, "POST", "/v1/push", `{"to": [], "txt": "x"}`, 400, 1004},
		{"no recipients", testAPIKey, "POST", "/v1/push", map[string]any{"to": []any{}, "text": "x"}, 400, 4001},
		{"unknown appcode", testAPIKey, "POST", "/v1/push", map[string]any{"to": []map[string]any{{"appcode": 999, "uid": 1}}, "text": "x"}, 400, 2004},
		{"other account system", testAPIKey, "POST", "/v1/push", map[string]any{"to": []map[string]any{{"appcode": 201, "uid": 1}}, "text": "x"}, 400, 4001},
		{"uid 0", testAPIKey, "POST", "/v1/push", map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 0}}, "text": "x"}, 400, 4001},
		{"too many recipients", testAPIKey, "POST", "/v1/push", map[string]any{"to": append(one, one[0], one[0], one[0], one[0], one[0]), "text": "x"}, 400, 4003},
		{"empty content", testAPIKey, "POST", "/v1/push", map[string]any{"to": one}, 400, 4002},
		{"both content and text", testAPIKey, "POST", "/v1/push", map[string]any{"to": one, "text": "x", "content": []byte("y")}, 400, 4003},
		{"body over the limit", testAPIKey, "POST", "/v1/push", map[string]any{"to": one, "text": strings.Repeat("x", 5000)}, 413, 0},
		{"GET on push", testAPIKey, "GET", "/v1/push", nil, 405, 0},
		{"unknown push id", testAPIKey, "GET", "/v1/push/12345", nil, 404, 0},
		{"bad push id", testAPIKey, "GET", "/v1/push/abc", nil, 400, 4003},
		{"presence without uid", testAPIKey, "GET", "/v1/presence", nil, 400, 4001},
		{"unknown path", testAPIKey, "GET", "/v2/nothing", nil, 404, 0},
	}
	for _, tc := range cases {
		var e struct {
			Error struct {
				Code    int    `json:"code"`
				Message string `json:"message"`
			} `json:"error"`
		}
		code := api(t, p, tc.method, tc.path, tc.key, tc.body, &e)
		if code != tc.code || e.Error.Code != tc.status || e.Error.Message == "" {
			t.Errorf("%s: HTTP %d code %d %q, want HTTP %d code %d", tc.name, code, e.Error.Code, e.Error.Message, tc.code, tc.status)
		}
	}
	time.Sleep(100 * time.Millisecond)
	if got.len() != 0 {
		t.Fatalf("a bad request pushed %d messages", got.len())
	}
	// A push id of another account system is not visible.
	var res pushResult
	if code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": one, "text": "ok"}, &res); code != 200 {
		t.Fatalf("good push: %d", code)
	}
	if code := api(t, p, "GET", "/v1/push/"+res.PushID, testAPIKey2, nil, nil); code != 404 {
		t.Fatalf("another account's push stats: HTTP %d, want 404", code)
	}
}

// TestOpenAPIDocument: schema/openapi.yaml documents every /v1 endpoint the
// server answers, and its request example works as written.
func TestOpenAPIDocument(t *testing.T) {
	raw, err := os.ReadFile("../../schema/openapi.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Paths map[string]map[string]struct {
			RequestBody struct {
				Content map[string]struct {
					Example map[string]any `yaml:"example"`
				} `yaml:"content"`
			} `yaml:"requestBody"`
		} `yaml:"paths"`
	}
	if err := yaml.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	want := map[string][]string{
		"/v1/push": {"post"}, "/v1/push/{push_id}": {"get"}, "/v1/presence": {"get"}, "/v1/broadcast": {"post"},
		"/v1/groups": {"post"}, "/v1/groups/{group_id}": {"get", "delete"},
		"/v1/groups/{group_id}/members": {"post", "delete"}, "/v1/users/{account}/{uid}/groups": {"get"},
		"/v1/admin/acl": {"get", "put"}, "/v1/gateways": {"get"},
	}
	for path, methods := range want {
		for _, method := range methods {
			if _, ok := doc.Paths[path][method]; !ok {
				t.Errorf("openapi.yaml does not document %s %s", method, path)
			}
		}
	}
	if len(doc.Paths) != len(want) {
		t.Errorf("openapi.yaml documents %d paths, the server serves %d", len(doc.Paths), len(want))
	}
	ex := doc.Paths["/v1/push"]["post"].RequestBody.Content["application/json"].Example
	p := start(t, nil)
	var got pushes
	driver(t, p, 101, 42, &got)
	var res pushResult
	if code := api(t, p, "POST", "/v1/push", testAPIKey, ex, &res); code != 200 || res.Online != 1 || res.Stored != 1 {
		t.Fatalf("the documented example: HTTP %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "example delivered", func() bool { return got.len() == 1 })
}

// TestS2CWithoutStore: a server run with no message store (an s2c-only
// deployment) delivers live pushes: the SDK's offline sync after login
// finds an empty inbox instead of an error that would hold the pushes
// back, while chat says plainly that it is unavailable.
func TestS2CWithoutStore(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Store.Engine = "none" })
	var ps pushes
	d := driver(t, p, 101, 5, &ps)
	var res struct {
		Online int `json:"online"`
	}
	if code := api(t, p, "POST", "/v1/push", testAPIKey, map[string]any{"to": []map[string]any{{"appcode": 101, "uid": 5}}, "text": "order"}, &res); code != 200 || res.Online != 1 {
		t.Fatalf("push: %d %+v", code, res)
	}
	eventually(t, 5*time.Second, "the live push", func() bool { return ps.len() == 1 })
	if n := inboxCount(t, d); n != 0 {
		t.Fatalf("offline count %d without a store", n)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	_, err := d.SendC2C(ctx, &pb.User{Account: 1, Uid: 6}, 0, []byte("hi"))
	if !errors.Is(err, sdk.ErrSendFailed) || !strings.Contains(err.Error(), "no message store") {
		t.Fatalf("c2c without a store: %v, want a failed send saying there is no store", err)
	}
}
