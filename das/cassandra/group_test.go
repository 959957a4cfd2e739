package cassandra

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	mrand "math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"

	"github.com/imd-dev/imd/das"
	"github.com/imd-dev/imd/das/dastest"
	"github.com/imd-dev/imd/schema/cql"
	"github.com/imd-dev/imd/schema/pb"
)

func TestGroupConformance(t *testing.T) {
	cfg := needCassandra(t)
	dastest.RunGroups(t, func(t *testing.T) das.GroupStore { return openTest(t, cfg) })
}

func newGroupID() uint64 { return mrand.Uint64N(1<<62) + 1 }

func groupEvent(kind pb.GroupEventKind, users ...das.User) *pb.C2CMessage {
	ev := &pb.C2CMessage{Msgid: msgidAround(time.Now()), From: &pb.User{}, To: &pb.User{}, Event: &pb.GroupEvent{Kind: kind}}
	ev.Event.Users = pbUsers(users)
	return ev
}

func groupMsg(gid uint64, from das.User, cmid string) *pb.C2CMessage {
	id := msgidAround(time.Now())
	return &pb.C2CMessage{
		Msgid: id, From: &pb.User{Account: from.Account, Uid: from.UID}, FromAppcode: 101, To: &pb.User{},
		GroupId: gid, Msgtype: 3, Content: fmt.Appendf(nil, "group message %d", id), ClientMsgId: cmid,
	}
}

func mustCreate(t *testing.T, s *Store, gid uint64, users ...das.User) {
	t.Helper()
	if _, err := s.CreateGroup(ctx, gid, users, 0, groupEvent(pb.GroupEventKind_GROUP_EVENT_CREATED, users...)); err != nil {
		t.Fatalf("CreateGroup(%d): %v", gid, err)
	}
}

// readStream reads group gid's whole stream through GroupPage.
func readStream(t *testing.T, s *Store, gid uint64) []*pb.C2CMessage {
	t.Helper()
	var all []*pb.C2CMessage
	after := uint64(0)
	for {
		msgs, more, err := s.GroupPage(ctx, gid, after, 0, 500)
		if err != nil {
			t.Fatalf("GroupPage(%d, %d): %v", gid, after, err)
		}
		all = append(all, msgs...)
		if !more {
			return all
		}
		after = msgs[len(msgs)-1].Seq
	}
}

// TestGroupTwoStores: two Stores, each with its own session and caches as
// two logic nodes have, append to one group at once, 8 writers each, half
// of the messages with client ids and each of those tried twice, once on
// each Store. Every seq from 2 to N+1 must be given exactly once, to
// exactly the messages that were acknowledged, and each sender's messages
// must keep their order.
func TestGroupTwoStores(t *testing.T) {
	cfg := needCassandra(t)
	stores := []*Store{openTest(t, cfg), openTest(t, cfg)}
	const writers, per = 8, 15
	var users []das.User
	for range writers {
		users = append(users, newUser())
	}
	gid := newGroupID()
	mustCreate(t, stores[0], gid, users...)

	type result struct {
		m *pb.C2CMessage
		a das.Appended
	}
	results := make([][]result, writers)
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range per {
				cmid := ""
				if i%2 == 0 {
					cmid = fmt.Sprintf("two-%d-%d-%d", gid, w, i)
				}
				m := groupMsg(gid, users[w], cmid)
				if cmid == "" {
					a, err := stores[(w+i)%2].AppendGroup(ctx, proto.Clone(m).(*pb.C2CMessage))
					if err != nil {
						t.Errorf("writer %d message %d: %v", w, i, err)
						return
					}
					results[w] = append(results[w], result{m, a})
					continue
				}
				var (
					tries sync.WaitGroup
					got   [2]das.Appended
					errs  [2]error
				)
				for k := range 2 {
					tries.Add(1)
					go func() {
						defer tries.Done()
						got[k], errs[k] = stores[k].AppendGroup(ctx, proto.Clone(m).(*pb.C2CMessage))
					}()
				}
				tries.Wait()
				if errs[0] != nil || errs[1] != nil {
					t.Errorf("writer %d message %d: %v, %v", w, i, errs[0], errs[1])
					return
				}
				if got[0].Seq != got[1].Seq || got[0].Msgid != m.Msgid || got[1].Msgid != m.Msgid || got[0].Dup == got[1].Dup {
					t.Errorf("writer %d message %d: tries %+v and %+v, want one stored and one dup of it", w, i, got[0], got[1])
					return
				}
				results[w] = append(results[w], result{m, got[0]})
			}
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	bySeq := map[uint64]uint64{}
	for w, rs := range results {
		last := uint64(0)
		for _, r := range rs {
			if r.a.Seq <= last {
				t.Fatalf("writer %d: seq %d after %d", w, r.a.Seq, last)
			}
			last = r.a.Seq
			if prev, ok := bySeq[r.a.Seq]; ok {
				t.Fatalf("seq %d given to msgids %d and %d", r.a.Seq, prev, r.m.Msgid)
			}
			bySeq[r.a.Seq] = r.m.Msgid
		}
	}
	const n = writers * per
	for _, s := range stores {
		all := readStream(t, s, gid)
		if len(all) != n+1 {
			t.Fatalf("stream of %d messages, want %d", len(all), n+1)
		}
		for i, m := range all {
			seq := uint64(i + 1)
			if m.Seq != seq || (seq > 1 && m.Msgid != bySeq[seq]) {
				t.Fatalf("stream[%d] = seq %d msgid %d, want seq %d msgid %d", i, m.Seq, m.Msgid, seq, bySeq[seq])
			}
		}
	}
	info, err := stores[1].Group(ctx, gid)
	if err != nil || info.Head != n+1 {
		t.Fatalf("Group = %+v, %v; want head %d", info, err, n+1)
	}
}

// TestGroupRepair: a writer that dies between a membership change's
// transaction and its member rows leaves applied_seq behind member_seq;
// the next reader of the membership writes the rows.
func TestGroupRepair(t *testing.T) {
	cfg := needCassandra(t)
	writer := openTest(t, cfg)
	a, b, c := newUser(), newUser(), newUser()
	gid := newGroupID()
	mustCreate(t, writer, gid, a, b)

	// appendOnly records a membership event as the writer would, and
	// stops before the member rows: the crash.
	appendOnly := func(kind pb.GroupEventKind, members int, users ...das.User) uint64 {
		t.Helper()
		w, _, err := writer.sequence(ctx, gid, func(ctx context.Context, st groupHead) (*seqWrite, error) {
			return writer.eventWrite(groupEvent(kind), gid, st.head+1, kind, users, members, false)
		})
		if err != nil {
			t.Fatalf("append %v: %v", kind, err)
		}
		return w.msg.Seq
	}
	raw := rawSession(t, cfg)
	applied := func() (ms, ap int64) {
		t.Helper()
		if err := raw.Query(stmtGroupApplied, i64(gid)).Scan(&ms, &ap); err != nil {
			t.Fatal(err)
		}
		return ms, ap
	}

	join := appendOnly(pb.GroupEventKind_GROUP_EVENT_JOINED, 3, c)
	if ms, ap := applied(); ms != int64(join) || ap != 1 {
		t.Fatalf("after the crash: member_seq %d applied_seq %d, want %d and 1", ms, ap, join)
	}
	// A new Store (another logic node) has no cached state.
	reader := openTest(t, cfg)
	members, v, err := reader.Members(ctx, gid)
	if err != nil || v != join {
		t.Fatalf("Members = %v at %d, %v; want version %d", members, v, err, join)
	}
	got := map[das.User]uint64{}
	for _, m := range members {
		got[m.User] = m.JoinSeq
	}
	if len(got) != 3 || got[a] != 1 || got[b] != 1 || got[c] != join {
		t.Fatalf("Members after repair = %v", got)
	}
	if ms, ap := applied(); ap != ms {
		t.Fatalf("after Members: member_seq %d applied_seq %d", ms, ap)
	}
	if gs, err := reader.UserGroups(ctx, c); err != nil || len(gs) != 1 || gs[0] != (das.Membership{GroupID: gid, JoinSeq: join}) {
		t.Fatalf("UserGroups(c) = %+v, %v", gs, err)
	}

	// A removal whose rows are lost is repaired by the removed user's
	// UserGroups (the group is in its list).
	leave := appendOnly(pb.GroupEventKind_GROUP_EVENT_LEFT, 2, b)
	other := openTest(t, cfg)
	gs, err := other.UserGroups(ctx, b)
	if err != nil || len(gs) != 1 || gs[0] != (das.Membership{GroupID: gid, JoinSeq: 1, LeftSeq: leave}) {
		t.Fatalf("UserGroups(b) after a lost removal = %+v, %v; want left at %d", gs, err, leave)
	}
	if _, err := other.AppendGroup(ctx, groupMsg(gid, b, "")); err == nil {
		t.Fatal("AppendGroup from the removed member: no error")
	}

	// The next membership change repairs a lost one before deciding.
	d := newUser()
	leaveC := appendOnly(pb.GroupEventKind_GROUP_EVENT_LEFT, 1, c)
	seq, added, err := openTest(t, cfg).AddMembers(ctx, gid, []das.User{c, d}, 3, groupEvent(pb.GroupEventKind_GROUP_EVENT_JOINED))
	if err != nil || seq != leaveC+1 || len(added) != 2 {
		t.Fatalf("AddMembers after a lost removal = %d, %v, %v; want both added at %d", seq, added, err, leaveC+1)
	}
	members, v, err = openTest(t, cfg).Members(ctx, gid)
	if err != nil || v != seq || len(members) != 3 {
		t.Fatalf("Members = %v at %d, %v", members, v, err)
	}
}

// TestGroupHeadOnlyInMeta: the newest message may be in group_meta alone
// (its writer died before copying it); readers take it from there, and
// the next append copies it before moving the head.
func TestGroupHeadOnlyInMeta(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a := newUser()
	gid := newGroupID()
	mustCreate(t, s, gid, a)
	// A writer that died right after its transaction: the claim and the
	// head are written, the stream copy is not.
	m := groupMsg(gid, a, "only-in-meta")
	m.Seq = 2
	body, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	key := &pb.C2CMessage{Msgid: m.Msgid, From: m.From, FromAppcode: m.FromAppcode, ClientMsgId: claimKey(m)}
	if won, _, err := s.claim(ctx, key, body, nil, writeTime(m.Msgid)); err != nil || !won {
		t.Fatalf("claim = %v, %v", won, err)
	}
	raw := rawSession(t, cfg)
	applied, err := raw.Query(`UPDATE group_meta SET head = 2, last_msg = ? WHERE group_id = ? IF head = 1`, body, i64(gid)).
		SerialConsistency(s.serial).ScanCAS()
	if err != nil || !applied {
		t.Fatalf("append by hand: %v, %v", applied, err)
	}
	fresh := openTest(t, cfg)
	all := readStream(t, fresh, gid)
	if len(all) != 2 || all[1].Msgid != m.Msgid || all[1].Seq != 2 {
		t.Fatalf("stream = %v, want the head from group_meta", all)
	}
	// A retry finds it at the head (and, like every append, copies the
	// head to the stream before it decides).
	if got, err := fresh.AppendGroup(ctx, groupMsg(gid, a, "only-in-meta")); err != nil || got != (das.Appended{Seq: 2, Msgid: m.Msgid, Dup: true, MemberSeq: 1}) {
		t.Fatalf("retry = %+v, %v", got, err)
	}
	m3 := groupMsg(gid, a, "")
	if got, err := fresh.AppendGroup(ctx, m3); err != nil || got.Seq != 3 {
		t.Fatalf("AppendGroup = %+v, %v", got, err)
	}
	var copied []byte
	if err := raw.Query(`SELECT msg FROM group_stream WHERE group_id = ? AND bucket = 0 AND seq = 2`, i64(gid)).Scan(&copied); err != nil {
		t.Fatalf("seq 2 not copied to the stream: %v", err)
	}
	var seq int64
	if err := raw.Query(stmtMsgidSeq, i64(gid), i64(m.Msgid)).Scan(&seq); err != nil || seq != 2 {
		t.Fatalf("group_msgids of seq 2: %d, %v", seq, err)
	}
	if got, err := s.AppendGroup(ctx, groupMsg(gid, a, "only-in-meta")); err != nil || got.Seq != 2 || got.Msgid != m.Msgid || !got.Dup {
		t.Fatalf("retry below the head = %+v, %v", got, err)
	}
}

// TestGroupRetryAfterClaim: a first attempt that died between its claim
// and its append is appended by the retry, once, with the first msgid and
// content.
func TestGroupRetryAfterClaim(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a := newUser()
	gid := newGroupID()
	mustCreate(t, s, gid, a)
	first := groupMsg(gid, a, "claimed")
	body, err := proto.Marshal(first)
	if err != nil {
		t.Fatal(err)
	}
	key := &pb.C2CMessage{Msgid: first.Msgid, From: first.From, FromAppcode: first.FromAppcode, ClientMsgId: claimKey(first)}
	if won, _, err := s.claim(ctx, key, body, nil, writeTime(first.Msgid)); err != nil || !won {
		t.Fatalf("claim = %v, %v", won, err)
	}
	// Concurrent retries on two Stores: one append.
	stores := []*Store{s, openTest(t, cfg)}
	var (
		wg   sync.WaitGroup
		got  [4]das.Appended
		errs [4]error
	)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			got[i], errs[i] = stores[i%2].AppendGroup(ctx, groupMsg(gid, a, "claimed"))
		}()
	}
	wg.Wait()
	for i := range got {
		if errs[i] != nil || got[i] != (das.Appended{Seq: 2, Msgid: first.Msgid, Dup: true, MemberSeq: 1}) {
			t.Fatalf("retry %d = %+v, %v; want seq 2 msgid %d dup", i, got[i], errs[i], first.Msgid)
		}
	}
	all := readStream(t, s, gid)
	if len(all) != 2 || string(all[1].Content) != string(first.Content) {
		t.Fatalf("stream = %v", all)
	}
}

// TestGroupCursorForgetRejoin: ForgetGroup drops every terminal's cursor
// up to the user's leaving, and nothing of its return.
func TestGroupCursorForgetRejoin(t *testing.T) {
	cfg := needCassandra(t)
	s := openTest(t, cfg)
	a, b := newUser(), newUser()
	gid := newGroupID()
	mustCreate(t, s, gid, a, b)
	for range 3 {
		if _, err := s.AppendGroup(ctx, groupMsg(gid, b, "")); err != nil {
			t.Fatal(err)
		}
	}
	for _, app := range []uint32{101, 102} {
		if err := s.AckGroup(ctx, term(a, app), gid, 3+uint64(app%2)); err != nil {
			t.Fatal(err)
		}
	}
	left, _, err := s.RemoveMembers(ctx, gid, []das.User{a}, groupEvent(pb.GroupEventKind_GROUP_EVENT_LEFT))
	if err != nil {
		t.Fatal(err)
	}
	if err := s.ForgetGroup(ctx, a, gid); err != nil {
		t.Fatal(err)
	}
	join, _, err := s.AddMembers(ctx, gid, []das.User{a}, 0, groupEvent(pb.GroupEventKind_GROUP_EVENT_JOINED))
	if err != nil || join != left+1 {
		t.Fatalf("AddMembers = %d, %v", join, err)
	}
	if err := s.AckGroup(ctx, term(a, 102), gid, join); err != nil {
		t.Fatal(err)
	}
	cur, err := s.GroupCursors(ctx, term(a, 101), []uint64{gid})
	if err != nil || cur[0] != 0 {
		t.Fatalf("cursor of 101 after forget = %v, %v", cur, err)
	}
	cur, err = s.GroupCursors(ctx, term(a, 102), []uint64{gid})
	if err != nil || cur[0] != join {
		t.Fatalf("cursor of 102 after rejoin = %v, %v; want %d", cur, err, join)
	}
	gs, err := s.UserGroups(ctx, a)
	if err != nil || len(gs) != 1 || gs[0] != (das.Membership{GroupID: gid, JoinSeq: join}) {
		t.Fatalf("UserGroups after rejoin = %+v, %v", gs, err)
	}
}

// TestGroupMigrateUpgrade: a keyspace at 001 (as deployed before groups)
// is upgraded by Migrate, and Open refuses it until then.
func TestGroupMigrateUpgrade(t *testing.T) {
	base := needCassandra(t)
	var b [4]byte
	_, _ = rand.Read(b[:])
	cfg := base
	cfg.Keyspace = "imd_test_up_" + hex.EncodeToString(b[:])
	t.Cleanup(func() { _ = DropKeyspace(context.Background(), cfg) })
	ms, err := cql.Migrations()
	if err != nil || len(ms) < 2 || ms[1].Name != "groups" {
		t.Fatalf("migrations: %v", err)
	}
	// The keyspace as Migrate left it before 002 existed.
	create, err := cql.CreateKeyspace(cfg.Keyspace, map[string]int{cfg.LocalDC: 1})
	if err != nil {
		t.Fatal(err)
	}
	admin := rawSession(t, Config{Hosts: base.Hosts, Keyspace: base.Keyspace, LocalDC: base.LocalDC})
	if err := admin.Query(create).Exec(); err != nil {
		t.Fatal(err)
	}
	old := rawSession(t, cfg)
	for _, stmt := range append([]string{cql.MigrationsTable}, ms[0].Statements...) {
		if err := old.Query(stmt).Exec(); err != nil {
			t.Fatalf("%s: %v", firstLine(stmt), err)
		}
	}
	if err := old.Query(`INSERT INTO schema_migrations (version, name, checksum, applied_at) VALUES (?, ?, ?, ?)`,
		ms[0].Version, ms[0].Name, ms[0].Checksum, time.Now()).Exec(); err != nil {
		t.Fatal(err)
	}
	if _, err := Open(ctx, cfg); err == nil {
		t.Fatal("Open of a keyspace without 002: no error")
	}
	if err := Migrate(ctx, cfg, nil); err != nil {
		t.Fatalf("Migrate: %v", err)
	}
	s := openTest(t, cfg)
	u := newUser()
	gid := newGroupID()
	mustCreate(t, s, gid, u)
	if a, err := s.AppendGroup(ctx, groupMsg(gid, u, "x")); err != nil || a.Seq != 2 {
		t.Fatalf("AppendGroup after the upgrade = %+v, %v", a, err)
	}
}

// BenchmarkGroupAppend appends 200-byte messages with client ids to one
// group from 8 goroutines per core (each a member of its own), on one
// Store, so the Store's per-group lock orders them and each append is one
// uncontended transaction and one stream write:
//
//	go test -run '^$' -bench GroupAppend -benchtime 2000x ./das/cassandra
//
// two-stores splits the goroutines over two Stores (two logic nodes),
// whose transactions contend in Paxos.
func BenchmarkGroupAppend(b *testing.B) {
	if testSetupErr != nil || testCfg.Keyspace == "" {
		b.Skipf("no Cassandra: %v", testSetupErr)
	}
	for _, nstores := range []int{1, 2} {
		b.Run(fmt.Sprintf("stores=%d", nstores), func(b *testing.B) {
			var stores []*Store
			for range nstores {
				stores = append(stores, openTest(b, testCfg))
			}
			gid := newGroupID()
			var users []das.User
			for range 64 {
				users = append(users, newUser())
			}
			if _, err := stores[0].CreateGroup(ctx, gid, users, 0, groupEvent(pb.GroupEventKind_GROUP_EVENT_CREATED, users...)); err != nil {
				b.Fatal(err)
			}
			var (
				lat  latencies
				next atomic.Uint64
				g    atomic.Int64
			)
			b.SetParallelism(4) // 8 goroutines on 2 cores
			b.ResetTimer()
			b.RunParallel(func(p *testing.PB) {
				k := g.Add(1)
				s := stores[int(k)%nstores]
				u := users[int(k)%len(users)]
				var mine []time.Duration
				for p.Next() {
					m := groupMsg(gid, u, fmt.Sprint("bench-", next.Add(1)))
					m.Content = benchContent
					t0 := time.Now()
					if _, err := s.AppendGroup(ctx, m); err != nil {
						b.Error(err)
						return
					}
					mine = append(mine, time.Since(t0))
				}
				lat.add(mine...)
			})
			b.StopTimer()
			lat.report(b, 1, "appends/s")
			info, err := stores[0].Group(ctx, gid)
			if err != nil || info.Head != uint64(b.N)+1 {
				b.Fatalf("head %d after %d appends, %v", info.Head, b.N, err)
			}
		})
	}
}
