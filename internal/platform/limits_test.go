package platform

import (
	"context"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	"github.com/imd-dev/imd/internal/ratelimit"
	"github.com/imd-dev/imd/schema"
	"github.com/imd-dev/imd/schema/pb"
	"github.com/imd-dev/imd/sdk"
)

// TestC2CSendsOverBudget: a user's messages over its send budget get 3001
// (the SDK gives up at once with one attempt); another user still sends.
func TestC2CSendsOverBudget(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Limits.Logic.C2CSendsPerUser = ratelimit.Rate{Rate: 0.01, Burst: 5} })
	once := func(o *sdk.Options) { o.SendAttempts = 1 }
	a := login(t, p, 101, 701, once)
	b := login(t, p, 101, 702, once)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ok, limited := 0, 0
	for range 8 {
		_, err := a.SendC2C(ctx, &pb.User{Account: 1, Uid: 702}, 1, []byte("hi"))
		switch {
		case err == nil:
			ok++
		case statusOf(err) == schema.StatusRateLimited:
			limited++
		default:
			t.Fatal(err)
		}
	}
	if ok != 5 || limited != 3 {
		t.Fatalf("%d sent and %d limited, want 5 and 3", ok, limited)
	}
	if _, err := b.SendC2C(ctx, &pb.User{Account: 1, Uid: 701}, 1, []byte("hello")); err != nil {
		t.Fatalf("another user's send: %v", err)
	}
	// A group message spends the same budget.
	id := gtCreate(t, p, gtUser(1, 701), gtUser(1, 702))
	if _, err := a.SendGroup(ctx, id, 1, []byte("all")); statusOf(err) != schema.StatusRateLimited {
		t.Fatalf("a group send over the budget: %v, want 3001", err)
	}
	if _, err := b.SendGroup(ctx, id, 1, []byte("all")); err != nil {
		t.Fatalf("another user's group send: %v", err)
	}
	if n := metricValue(t, p.Registry, "imd_logic_rate_limited_total", "limit", "c2c_send"); n != 4 {
		t.Fatalf("imd_logic_rate_limited_total{c2c_send} = %v, want 4", n)
	}
}

// TestPushesOverBudget: an app's pushes over its budget are answered 429
// with status 3001; another app's key still pushes.
func TestPushesOverBudget(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Limits.Logic.PushesPerApp = ratelimit.Rate{Rate: 0.01, Burst: 3} })
	push := func(key string, appcode uint32) (int, apiError) {
		var out struct {
			Error apiError `json:"error"`
		}
		code := api(t, p, "POST", "/v1/push", key, map[string]any{"to": []map[string]any{{"appcode": appcode, "uid": 1}}, "text": "x"}, &out)
		return code, out.Error
	}
	for i := range 3 {
		if code, e := push(testAPIKey, 101); code != 200 {
			t.Fatalf("push %d within the budget: %d %+v", i, code, e)
		}
	}
	code, e := push(testAPIKey, 101)
	if code != 429 || e.Code != uint16(schema.StatusRateLimited) || !e.Retryable {
		t.Fatalf("push over the budget: %d %+v, want 429 with code 3001", code, e)
	}
	if code, e := push(testAPIKey2, 201); code != 200 {
		t.Fatalf("another app's push: %d %+v", code, e)
	}
	if n := metricValue(t, p.Registry, "imd_logic_rate_limited_total", "limit", "push"); n != 1 {
		t.Fatalf("imd_logic_rate_limited_total{push} = %v, want 1", n)
	}
}

type apiError struct {
	Code      uint16 `json:"code"`
	Message   string `json:"message"`
	Retryable bool   `json:"retryable"`
}

// TestGatewayLimitsFromConfig: the `limits:` section reaches the gateway:
// connections beyond the per-address bucket get one 3001 frame and are
// closed, and the refusals are counted.
func TestGatewayLimitsFromConfig(t *testing.T) {
	p := start(t, func(c *config.Config) { c.Limits.Gateway.ConnsPerIP = ratelimit.Rate{Rate: 0.01, Burst: 2} })
	dialRaw(t, p.GatewayAddr()).login(101, 711, 1)
	dialRaw(t, p.GatewayAddr()).login(101, 712, 1)
	r := dialRaw(t, p.GatewayAddr())
	r.readError(schema.StatusRateLimited)
	r.expectClosed(2 * time.Second)
	if n := metricValue(t, p.Registry, "imd_gateway_rate_limited_total", "limit", "conns_per_ip"); n != 1 {
		t.Fatalf("imd_gateway_rate_limited_total{conns_per_ip} = %v, want 1", n)
	}
}
