package logic

import (
	"bytes"
	"crypto/subtle"
	"encoding/json"
	"log/slog"
	"strings"

	"github.com/imd-dev/imd/internal/acl"
	"github.com/imd-dev/imd/schema"
	"github.com/valyala/fasthttp"
)

// authAdmin reports whether the request carries the admin key, or answers
// 401 (404 when the admin API is off). App API keys are not admin keys.
func authAdmin(o HTTPOptions, ctx *fasthttp.RequestCtx) bool {
	if o.AdminKey == "" {
		writeError(ctx, fasthttp.StatusNotFound, 0, "the admin API is off: set admin.api_key")
		return false
	}
	auth := strings.TrimSpace(string(ctx.Request.Header.Peek("Authorization")))
	scheme, key, _ := strings.Cut(auth, " ")
	key = strings.TrimLeft(key, " ")
	if !strings.EqualFold(scheme, "Bearer") || key == "" {
		ctx.Response.Header.Set("WWW-Authenticate", `Bearer realm="imd-admin"`)
		writeError(ctx, fasthttp.StatusUnauthorized, 0, "missing `Authorization: Bearer <admin key>`")
		return false
	}
	if subtle.ConstantTimeCompare([]byte(key), []byte(o.AdminKey)) != 1 {
		writeError(ctx, fasthttp.StatusUnauthorized, 0, "not the admin key")
		return false
	}
	return true
}

// handleAdminACL serves GET /v1/admin/acl (the lists in force) and PUT
// /v1/admin/acl (replace them whole; the answer is the lists in force).
func handleAdminACL(svc *Service, o HTTPOptions, ctx *fasthttp.RequestCtx, log *slog.Logger, logid uint64) {
	if !ctx.IsGet() && !ctx.IsPut() {
		writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET or PUT")
		return
	}
	if !authAdmin(o, ctx) {
		return
	}
	if ctx.IsPut() {
		var l acl.Lists
		dec := json.NewDecoder(bytes.NewReader(ctx.PostBody()))
		dec.DisallowUnknownFields()
		if err := dec.Decode(&l); err != nil {
			writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, "body: "+err.Error())
			return
		}
		if err := l.Validate(); err != nil {
			writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, err.Error())
			return
		}
		set := o.SetACL
		if set == nil {
			set = svc.SetACL
		}
		if err := set(ctx, l); err != nil {
			log.Warn("admin: set the acl", "err", err, "logid", logid)
			writeStatusError(ctx, err)
			return
		}
		log.Info("admin: acl replaced", "ip_block", len(l.IPBlock), "ip_allow", len(l.IPAllow), "uid_block", len(l.UIDBlock), "remote", ctx.RemoteAddr().String(), "logid", logid)
	}
	writeJSON(ctx, fasthttp.StatusOK, svc.ACL().Lists())
}
