package logic

import (
	"bytes"
	"encoding/json"
	"log/slog"
	"strconv"
	"strings"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/schema"
	"github.com/valyala/fasthttp"
)

// groupBody is the JSON body of the group endpoints.
type groupBody struct {
	GroupID string        `json:"group_id"` // decimal; empty: the platform assigns one
	Members []GroupMember `json:"members"`
}

// groupInfo is the answer of GET /v1/groups/{id}.
type groupInfo struct {
	GroupID uint64        `json:"group_id,string"`
	Head    uint64        `json:"head"`
	Size    int           `json:"size"`
	Members []GroupMember `json:"members"`
}

// userGroup is one group in GET /v1/users/{account}/{uid}/groups.
type userGroup struct {
	GroupID uint64 `json:"group_id,string"`
	JoinSeq uint64 `json:"join_seq"`
	LeftSeq uint64 `json:"left_seq,omitempty"`
}

func decodeGroupBody(ctx *fasthttp.RequestCtx, b *groupBody) bool {
	dec := json.NewDecoder(bytes.NewReader(ctx.PostBody()))
	dec.DisallowUnknownFields()
	if err := dec.Decode(b); err != nil {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadBody, "bad JSON: "+err.Error())
		return false
	}
	return true
}

func parseID(ctx *fasthttp.RequestCtx, text, what string) (uint64, bool) {
	id, err := strconv.ParseUint(text, 10, 64)
	if err != nil || id == 0 || id > das.MaxMsgid {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, what+" must be a decimal number from 1 to 2^63-1")
		return 0, false
	}
	return id, true
}

// handleGroups serves /v1/groups[/{id}[/members]]; rest is the path after
// /v1/groups. Groups are the app-servers' to manage: the platform holds no
// rule about who may join, and any app's key may manage any group.
func handleGroups(svc *Service, app *App, ctx *fasthttp.RequestCtx, rest string, log *slog.Logger, logid uint64) {
	var (
		res any
		err error
	)
	parts := strings.Split(strings.Trim(rest, "/"), "/")
	switch {
	case rest == "" || rest == "/":
		if !ctx.IsPost() {
			writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use POST to create a group")
			return
		}
		var b groupBody
		if !decodeGroupBody(ctx, &b) {
			return
		}
		var id uint64
		if b.GroupID != "" {
			var ok bool
			if id, ok = parseID(ctx, b.GroupID, "group_id"); !ok {
				return
			}
		}
		res, err = svc.CreateGroup(ctx, app, id, b.Members, logid)
	case len(parts) == 1:
		id, ok := parseID(ctx, parts[0], "the group id")
		if !ok {
			return
		}
		switch {
		case ctx.IsGet():
			var info das.GroupInfo
			var members []GroupMember
			if info, members, err = svc.GroupMembers(ctx, id); err == nil {
				res = groupInfo{GroupID: id, Head: info.Head, Size: len(members), Members: members}
			}
		case ctx.IsDelete():
			res, err = svc.DissolveGroup(ctx, app, id, logid)
		default:
			writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use GET or DELETE")
			return
		}
	case len(parts) == 2 && parts[1] == "members":
		id, ok := parseID(ctx, parts[0], "the group id")
		if !ok {
			return
		}
		if !ctx.IsPost() && !ctx.IsDelete() {
			writeError(ctx, fasthttp.StatusMethodNotAllowed, 0, "use POST to add members, DELETE to remove them")
			return
		}
		var b groupBody
		if !decodeGroupBody(ctx, &b) {
			return
		}
		if ctx.IsPost() {
			res, err = svc.AddGroupMembers(ctx, app, id, b.Members, logid)
		} else {
			res, err = svc.RemoveGroupMembers(ctx, app, id, b.Members, logid)
		}
	default:
		writeError(ctx, fasthttp.StatusNotFound, 0, "no such endpoint: /v1/groups"+rest)
		return
	}
	if err != nil {
		writeStatusError(ctx, err)
		log.Info("group request refused", "path", string(ctx.Path()), "method", string(ctx.Method()), "appcode", app.AppCode, "err", err, "logid", logid)
		return
	}
	writeJSON(ctx, fasthttp.StatusOK, res)
}

// handleUserGroups serves GET /v1/users/{account}/{uid}/groups; rest is
// "{account}/{uid}".
func handleUserGroups(svc *Service, _ *App, ctx *fasthttp.RequestCtx, rest string) {
	accText, uidText, ok := strings.Cut(rest, "/")
	acc, err1 := strconv.ParseUint(accText, 10, 32)
	uid, err2 := strconv.ParseUint(uidText, 10, 64)
	if !ok || err1 != nil || err2 != nil || acc == 0 || uid == 0 {
		writeError(ctx, fasthttp.StatusBadRequest, schema.StatusBadArgument, "use /v1/users/{account}/{uid}/groups with decimal numbers above 0")
		return
	}
	ms, err := svc.UserGroups(ctx, das.User{Account: uint32(acc), UID: uid})
	if err != nil {
		writeStatusError(ctx, err)
		return
	}
	out := make([]userGroup, len(ms))
	for i, m := range ms {
		out[i] = userGroup{GroupID: m.GroupID, JoinSeq: m.JoinSeq, LeftSeq: m.LeftSeq}
	}
	writeJSON(ctx, fasthttp.StatusOK, map[string]any{"account": acc, "uid": uid, "groups": out})
}
