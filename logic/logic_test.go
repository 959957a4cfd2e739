package logic

import (
	"strings"
	"testing"

	"github.com/imd-dev/imd/router"
)

func TestNewValidatesApps(t *testing.T) {
	secret := []string{"0123456789abcdef0123"}
	cases := []struct {
		name string
		apps []App
		want string
	}{
		{"shared api key", []App{
			{AppCode: 1, Account: 1, Secrets: secret, APIKeys: []string{"key-0123456789abcdef"}},
			{AppCode: 2, Account: 2, Secrets: secret, APIKeys: []string{"key-0123456789abcdef"}},
		}, "share an api key"},
		{"short api key", []App{{AppCode: 1, Account: 1, Secrets: secret, APIKeys: []string{"short"}}}, "at least 16 bytes"},
		{"appcode twice", []App{{AppCode: 1, Account: 1, Secrets: secret}, {AppCode: 1, Account: 1, Secrets: secret}}, "configured twice"},
		{"no secret", []App{{AppCode: 1, Account: 1}}, "secret"},
		{"route twice", nil, "mapped twice"},
	}
	for _, tc := range cases {
		o := Options{Apps: tc.apps, Router: router.NewMemory()}
		if tc.name == "route twice" {
			o.C2S.Routes = []Route{{AppCode: 1, MsgType: 1, Topic: "a"}, {AppCode: 1, MsgType: 1, Topic: "b"}}
		}
		if _, err := New(o); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error about %q", tc.name, err, tc.want)
		}
	}
	ok := Options{Router: router.NewMemory(), Apps: []App{
		{AppCode: 1, Account: 1, Secrets: secret, APIKeys: []string{"key-a-0123456789abcdef"}},
		{AppCode: 2, Account: 1, Secrets: secret, APIKeys: []string{"key-b-0123456789abcdef"}},
	}}
	s, err := New(ok)
	if err != nil {
		t.Fatal(err)
	}
	if a := s.AppByKey("key-b-0123456789abcdef"); a == nil || a.AppCode != 2 {
		t.Fatalf("AppByKey: %+v", a)
	}
	if a := s.AppByKey("key-c"); a != nil {
		t.Fatalf("unknown key matched %+v", a)
	}
}
