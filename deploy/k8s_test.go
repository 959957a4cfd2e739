package deploy

import (
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/imd-dev/imd/internal/config"
	appsv1 "k8s.io/api/apps/v1"
	batchv1 "k8s.io/api/batch/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// The Secrets the manifests reference, created apart by the operator
// (deploy/README.md says how), with their keys.
var k8sSecrets = map[string][]string{
	"imd-secrets":     {"rpc-secret", "redis-password", "cassandra-username", "cassandra-password", "admin-api-key"},
	"imd-apps":        {"apps.yaml"},
	"imd-gateway-tls": {"tls.crt", "tls.key"},
}

// appsExample stands for the Secret imd-apps in the tests.
const appsExample = "k8s/base/apps.example.yaml"

// manifests is one rendered kustomization, every object decoded strictly
// into the Kubernetes API's own types.
type manifests struct {
	dir         string
	deployments []*appsv1.Deployment
	jobs        []*batchv1.Job
	services    []*corev1.Service
	pdbs        []*policyv1.PodDisruptionBudget
	configMaps  map[string]*corev1.ConfigMap
}

// workload is a Deployment or a Job: what runs imd.
type workload struct {
	where  string
	labels map[string]string
	spec   *corev1.PodSpec
}

func (m *manifests) workloads() []workload {
	var w []workload
	for _, d := range m.deployments {
		w = append(w, workload{m.dir + ": Deployment " + d.Name, d.Spec.Template.Labels, &d.Spec.Template.Spec})
	}
	for _, j := range m.jobs {
		w = append(w, workload{m.dir + ": Job " + j.Name, j.Spec.Template.Labels, &j.Spec.Template.Spec})
	}
	return w
}

// render builds the kustomization in dir with kustomize's own library (what
// `kubectl apply -k` runs) and decodes each object strictly: a field the
// API does not define, a value of the wrong type or a key given twice is
// an error, as it is for the API server's strict field validation.
func render(t *testing.T, dir string) *manifests {
	t.Helper()
	k := krusty.MakeKustomizer(krusty.MakeDefaultOptions())
	rm, err := k.Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	m := &manifests{dir: dir, configMaps: map[string]*corev1.ConfigMap{}}
	for _, r := range rm.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		gvk := r.GetApiVersion() + " " + r.GetKind()
		where := fmt.Sprintf("%s: %s %s", dir, r.GetKind(), r.GetName())
		var obj any
		switch gvk {
		case "apps/v1 Deployment":
			d := &appsv1.Deployment{}
			m.deployments, obj = append(m.deployments, d), d
		case "batch/v1 Job":
			j := &batchv1.Job{}
			m.jobs, obj = append(m.jobs, j), j
		case "v1 Service":
			s := &corev1.Service{}
			m.services, obj = append(m.services, s), s
		case "policy/v1 PodDisruptionBudget":
			p := &policyv1.PodDisruptionBudget{}
			m.pdbs, obj = append(m.pdbs, p), p
		case "v1 ConfigMap":
			c := &corev1.ConfigMap{}
			m.configMaps[r.GetName()], obj = c, c
		default:
			t.Errorf("%s: %s: a kind these tests do not check; add it to render", where, gvk)
			continue
		}
		if err := yaml.UnmarshalStrict(b, obj); err != nil {
			t.Errorf("%s: not a valid %s: %v", where, gvk, err)
		}
		if r.GetNamespace() == "" {
			t.Errorf("%s: no namespace", where)
		}
		checkMeta(t, where, r.GetName(), r.GetLabels())
	}
	return m
}

func checkMeta(t *testing.T, where, name string, l map[string]string) {
	t.Helper()
	for _, e := range validation.IsDNS1123Subdomain(name) {
		t.Errorf("%s: name: %s", where, e)
	}
	for k, v := range l {
		for _, e := range validation.IsQualifiedName(k) {
			t.Errorf("%s: label %s: %s", where, k, e)
		}
		for _, e := range validation.IsValidLabelValue(v) {
			t.Errorf("%s: label %s=%s: %s", where, k, v, e)
		}
	}
}

// k8sDirs are the kustomizations: the base and one overlay per DC.
func k8sDirs(t *testing.T) (base string, overlays []string) {
	t.Helper()
	overlays, err := filepath.Glob("k8s/overlays/*")
	if err != nil || len(overlays) < 2 {
		t.Fatalf("want an overlay per DC under k8s/overlays (two at least): %v %v", overlays, err)
	}
	return "k8s/base", overlays
}

// TestK8sManifests renders the base and every DC's overlay and checks the
// objects against the API schema and against each other: selectors find
// pods, named ports exist, ConfigMaps and their keys exist, Secrets are
// the documented ones, probes ask the health endpoints on the port imd
// serves them on, and the grace period outlasts the drain.
func TestK8sManifests(t *testing.T) {
	base, overlays := k8sDirs(t)
	readme, err := os.ReadFile("README.md")
	if err != nil {
		t.Fatal(err)
	}
	for name, keys := range k8sSecrets {
		for _, s := range append([]string{name}, keys...) {
			if !strings.Contains(string(readme), s) {
				t.Errorf("deploy/README.md does not mention %s, which the manifests need (Secret %s)", s, name)
			}
		}
	}
	for _, dir := range append([]string{base}, overlays...) {
		m := render(t, dir)
		checkK8s(t, m)
	}
}

// TestK8sDCs checks what makes each overlay its DC: cluster.dc and the
// Cassandra DC come from the overlay's imd-dc, the pods carry the DC's
// label, and the keyspace's replication names every DC.
func TestK8sDCs(t *testing.T) {
	_, overlays := k8sDirs(t)
	seen := map[string]string{}
	for _, dir := range overlays {
		dc := filepath.Base(dir)
		m := render(t, dir)
		dcEnv := m.configMap(t, "imd-dc")
		if dcEnv == nil {
			continue
		}
		for _, k := range []string{"IMD_DC", "IMD_CASSANDRA_DC"} {
			if dcEnv.Data[k] != dc {
				t.Errorf("%s: imd-dc %s=%q, want %q", dir, k, dcEnv.Data[k], dc)
			}
		}
		for _, k := range []string{"IMD_REDIS_ADDRS", "IMD_CASSANDRA_HOSTS"} {
			if other, dup := seen[k+"="+dcEnv.Data[k]]; dup {
				t.Errorf("%s: %s is %s's too: each DC has its own", dir, k, other)
			}
			seen[k+"="+dcEnv.Data[k]] = dir
		}
		for _, w := range m.workloads() {
			if w.labels["imd.dev/dc"] != dc {
				t.Errorf("%s: pods labelled imd.dev/dc=%q, want %q", w.where, w.labels["imd.dev/dc"], dc)
			}
		}
		cfg := m.configMap(t, "imd-config")
		if cfg == nil {
			continue
		}
		var c struct {
			Store struct {
				Cassandra struct {
					Replication string `yaml:"replication"`
				} `yaml:"cassandra"`
			} `yaml:"store"`
		}
		if err := yaml.Unmarshal([]byte(cfg.Data["imd.yaml"]), &c); err != nil {
			t.Fatal(err)
		}
		for _, o := range overlays {
			if !regexp.MustCompile(`(^|,)\s*` + regexp.QuoteMeta(filepath.Base(o)) + `:\d+`).MatchString(c.Store.Cassandra.Replication) {
				t.Errorf("%s: store.cassandra.replication %q does not name DC %s", dir, c.Store.Cassandra.Replication, filepath.Base(o))
			}
		}
	}
}

// TestK8sConfigStarts starts the real imd the way each pod does (its
// arguments, its environment with the ConfigMaps' values and stand-ins
// for the Secrets, its config file as the pod assembles it): imd must
// accept it all and get as far as dialling Redis (Cassandra for migrate).
func TestK8sConfigStarts(t *testing.T) {
	base, overlays := k8sDirs(t)
	for _, dir := range append([]string{base}, overlays...) {
		m := render(t, dir)
		for _, w := range m.workloads() {
			args, env, cfgText := m.podCommand(t, w)
			if args == nil {
				continue
			}
			t.Run(strings.NewReplacer(" ", "_", "/", "_", ":", "").Replace(w.where), func(t *testing.T) {
				t.Parallel()
				path := filepath.Join(t.TempDir(), "imd.yaml")
				if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
					t.Fatal(err)
				}
				startUntilDial(t, w.where, withConfig(args, path), env)
			})
		}
	}
}

func (m *manifests) configMap(t *testing.T, prefix string) *corev1.ConfigMap {
	t.Helper()
	for name, c := range m.configMaps {
		if name == prefix || strings.HasPrefix(name, prefix+"-") {
			return c
		}
	}
	t.Errorf("%s: no ConfigMap %s", m.dir, prefix)
	return nil
}

// withConfig points --config at path.
func withConfig(args []string, path string) []string {
	out := append([]string{}, args...)
	for i, a := range out {
		switch {
		case strings.HasPrefix(a, "--config="):
			out[i] = "--config=" + path
		case a == "--config" && i+1 < len(out):
			out[i+1] = path
		}
	}
	return out
}

func checkK8s(t *testing.T, m *manifests) {
	t.Helper()
	for _, d := range m.deployments {
		where := m.dir + ": Deployment " + d.Name
		sel, err := metav1.LabelSelectorAsSelector(d.Spec.Selector)
		if err != nil || !sel.Matches(labels.Set(d.Spec.Template.Labels)) {
			t.Errorf("%s: selector %v does not match its pod template's labels %v (%v)", where, d.Spec.Selector, d.Spec.Template.Labels, err)
		}
		if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
			t.Errorf("%s: want 2 replicas at least, so one can drain", where)
		}
		covered := false
		for _, p := range m.pdbs {
			s, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
			covered = covered || (err == nil && s.Matches(labels.Set(d.Spec.Template.Labels)))
		}
		if !covered {
			t.Errorf("%s: no PodDisruptionBudget selects its pods", where)
		}
	}
	for _, j := range m.jobs {
		where := m.dir + ": Job " + j.Name
		if rp := j.Spec.Template.Spec.RestartPolicy; rp != corev1.RestartPolicyNever && rp != corev1.RestartPolicyOnFailure {
			t.Errorf("%s: restartPolicy %q", where, rp)
		}
		if j.Spec.BackoffLimit == nil {
			t.Errorf("%s: no backoffLimit", where)
		}
		def, err := time.ParseDuration(help(t, "migrate").defaults["timeout"])
		if err != nil {
			t.Fatalf("imd migrate --help: no default --timeout: %v", err)
		}
		if j.Spec.ActiveDeadlineSeconds == nil || time.Duration(*j.Spec.ActiveDeadlineSeconds)*time.Second <= def {
			t.Errorf("%s: activeDeadlineSeconds must exceed imd migrate's --timeout (%s)", where, def)
		}
	}
	for _, w := range m.workloads() {
		m.checkPod(t, w)
	}
	for _, s := range m.services {
		m.checkService(t, s)
	}
	for _, p := range m.pdbs {
		where := m.dir + ": PodDisruptionBudget " + p.Name
		if (p.Spec.MaxUnavailable == nil) == (p.Spec.MinAvailable == nil) {
			t.Errorf("%s: set one of maxUnavailable and minAvailable", where)
		}
		s, err := metav1.LabelSelectorAsSelector(p.Spec.Selector)
		if err != nil || len(m.podsSelected(s)) == 0 {
			t.Errorf("%s: selects no pods (%v)", where, err)
		}
	}
}

// podsSelected returns the workloads whose pods sel selects.
func (m *manifests) podsSelected(sel labels.Selector) []workload {
	var out []workload
	if sel.Empty() {
		return nil // an empty selector would select everything: refuse it
	}
	for _, w := range m.workloads() {
		if sel.Matches(labels.Set(w.labels)) {
			out = append(out, w)
		}
	}
	return out
}

func (m *manifests) checkService(t *testing.T, s *corev1.Service) {
	t.Helper()
	where := m.dir + ": Service " + s.Name
	pods := m.podsSelected(labels.SelectorFromSet(s.Spec.Selector))
	if len(pods) != 1 {
		t.Errorf("%s: selector %v selects the pods of %d workloads, want 1", where, s.Spec.Selector, len(pods))
		return
	}
	if len(s.Spec.Ports) == 0 {
		t.Errorf("%s: no ports", where)
	}
	for _, p := range s.Spec.Ports {
		for _, e := range validation.IsValidPortName(p.Name) {
			t.Errorf("%s: port name %q: %s", where, p.Name, e)
		}
		if p.Port < 1 || p.Port > 65535 {
			t.Errorf("%s: port %d", where, p.Port)
		}
		if p.TargetPort.Type != intstr.String {
			t.Errorf("%s: port %s: name the target port (targetPort: <container port name>) so the pods define it", where, p.Name)
			continue
		}
		if _, ok := containerPort(pods[0].spec, p.TargetPort.StrVal); !ok {
			t.Errorf("%s: targetPort %s: %s has no container port of that name", where, p.TargetPort.StrVal, pods[0].where)
		}
	}
	clients := !slices.ContainsFunc(s.Spec.Ports, func(p corev1.ServicePort) bool { return p.Name == "peer" })
	if clients && s.Spec.Type == corev1.ServiceTypeLoadBalancer && s.Spec.ExternalTrafficPolicy != corev1.ServiceExternalTrafficPolicyLocal {
		t.Errorf("%s: a LoadBalancer for clients keeps their addresses (per-address limits, acl) only with externalTrafficPolicy: Local", where)
	}
}

func containerPort(spec *corev1.PodSpec, name string) (int32, bool) {
	for _, c := range spec.Containers {
		for _, p := range c.Ports {
			if p.Name == name {
				return p.ContainerPort, true
			}
		}
	}
	return 0, false
}

// imdContainer is the container of a pod that runs imd (its first
// argument is a role), or nil.
func imdContainer(spec *corev1.PodSpec) *corev1.Container {
	for i := range spec.Containers {
		c := &spec.Containers[i]
		if len(c.Args) > 0 && contains(roles, c.Args[0]) {
			return c
		}
	}
	return nil
}

func (m *manifests) checkPod(t *testing.T, w workload) {
	t.Helper()
	spec := w.spec
	if sc := spec.SecurityContext; sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot {
		t.Errorf("%s: set securityContext.runAsNonRoot", w.where)
	}
	volumes := map[string]corev1.Volume{}
	used := map[string]bool{}
	for _, v := range spec.Volumes {
		volumes[v.Name] = v
		switch {
		case v.ConfigMap != nil:
			cm := m.configMap(t, strings.TrimSuffix(v.ConfigMap.Name, "-"+lastDash(v.ConfigMap.Name)))
			if cm != nil && cm.Name != v.ConfigMap.Name {
				t.Errorf("%s: volume %s: ConfigMap %s is not the generated %s", w.where, v.Name, v.ConfigMap.Name, cm.Name)
			}
			for _, it := range v.ConfigMap.Items {
				if cm != nil {
					if _, ok := cm.Data[it.Key]; !ok {
						t.Errorf("%s: volume %s: ConfigMap %s has no key %s", w.where, v.Name, cm.Name, it.Key)
					}
				}
			}
		case v.Secret != nil:
			keys, ok := k8sSecrets[v.Secret.SecretName]
			if !ok {
				t.Errorf("%s: volume %s: Secret %s is not one deploy/README.md documents", w.where, v.Name, v.Secret.SecretName)
			}
			for _, it := range v.Secret.Items {
				if !contains(keys, it.Key) {
					t.Errorf("%s: volume %s: Secret %s has no documented key %s", w.where, v.Name, v.Secret.SecretName, it.Key)
				}
			}
		}
	}
	all := append(append([]corev1.Container{}, spec.InitContainers...), spec.Containers...)
	for i := range all {
		c := &all[i]
		where := w.where + " container " + c.Name
		for _, e := range validation.IsDNS1123Label(c.Name) {
			t.Errorf("%s: name: %s", where, e)
		}
		if c.Image == "" {
			t.Errorf("%s: no image", where)
		}
		if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() || c.Resources.Limits.Memory().IsZero() {
			t.Errorf("%s: set cpu and memory requests and a memory limit", where)
		}
		sc := c.SecurityContext
		if sc == nil || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation ||
			sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem ||
			sc.Capabilities == nil || len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" {
			t.Errorf("%s: securityContext: want allowPrivilegeEscalation false, readOnlyRootFilesystem true, capabilities drop ALL", where)
		}
		for _, vm := range c.VolumeMounts {
			used[vm.Name] = true
			if _, ok := volumes[vm.Name]; !ok {
				t.Errorf("%s: mounts volume %s, which the pod does not declare", where, vm.Name)
			}
		}
		names := map[string]bool{}
		for _, p := range c.Ports {
			for _, e := range validation.IsValidPortName(p.Name) {
				t.Errorf("%s: port name %q: %s", where, p.Name, e)
			}
			if names[p.Name] {
				t.Errorf("%s: port name %s twice", where, p.Name)
			}
			names[p.Name] = true
			if p.ContainerPort < 1 || p.ContainerPort > 65535 {
				t.Errorf("%s: port %d", where, p.ContainerPort)
			}
		}
		defined := map[string]bool{}
		for _, e := range c.Env {
			for _, ref := range regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`).FindAllStringSubmatch(e.Value, -1) {
				if !defined[ref[1]] {
					t.Errorf("%s: env %s uses $(%s), not defined before it", where, e.Name, ref[1])
				}
			}
			defined[e.Name] = true
			if e.ValueFrom == nil {
				continue
			}
			switch r := e.ValueFrom; {
			case r.SecretKeyRef != nil:
				if !contains(k8sSecrets[r.SecretKeyRef.Name], r.SecretKeyRef.Key) {
					t.Errorf("%s: env %s: Secret %s key %s is not one deploy/README.md documents", where, e.Name, r.SecretKeyRef.Name, r.SecretKeyRef.Key)
				}
			case r.ConfigMapKeyRef != nil:
				cm := m.configMapNamed(r.ConfigMapKeyRef.Name)
				if cm == nil {
					t.Errorf("%s: env %s: no ConfigMap %s", where, e.Name, r.ConfigMapKeyRef.Name)
				} else if _, ok := cm.Data[r.ConfigMapKeyRef.Key]; !ok {
					t.Errorf("%s: env %s: ConfigMap %s has no key %s", where, e.Name, cm.Name, r.ConfigMapKeyRef.Key)
				}
			}
		}
		for _, ef := range c.EnvFrom {
			if ef.ConfigMapRef == nil || m.configMapNamed(ef.ConfigMapRef.Name) == nil {
				t.Errorf("%s: envFrom: want an existing ConfigMap", where)
			}
		}
	}
	for name := range volumes {
		if !used[name] {
			t.Errorf("%s: volume %s is mounted by no container", w.where, name)
		}
	}
	c := imdContainer(spec)
	if c == nil {
		t.Errorf("%s: no container runs imd (args: <role> ...)", w.where)
		return
	}
	where := w.where + " container " + c.Name
	role := checkArgs(t, where, c.Args)
	if role == "" {
		return
	}
	env := m.containerEnv(c)
	checkEnvNames(t, where, role, sortedKeys(env))
	if role == "migrate" {
		return
	}
	// What this imd will listen on, from its config file, environment
	// and flags as imd reads them; the pod's ports must be those.
	_, _, cfgText := m.podCommand(t, w)
	cfg := loadConfig(t, where, role, c.Args, env, cfgText)
	if cfg == nil {
		return
	}
	want := map[string]string{"http": cfg.HTTP.Addr}
	if role != "gateway" {
		want["rpc"] = cfg.Cluster.RPCAddr
		if want["rpc"] == "" {
			want["rpc"] = ":7071"
		}
		if len(cfg.Cluster.Rooms) > 0 { // the other DCs' logic nodes link in
			want["peer"] = cfg.Cluster.PeerAddr
			if want["peer"] == "" {
				want["peer"] = ":7074"
			}
		}
	}
	if role != "logic" {
		if cfg.Gateway.TLSAddr != "" {
			want["tls"] = cfg.Gateway.TLSAddr
		}
		if cfg.Gateway.TLSAddr == "" || cfg.Gateway.PlainTCP {
			want["tcp"] = cfg.Gateway.Addr
		}
		if cfg.Gateway.WebAddr != "" {
			want["web"] = cfg.Gateway.WebAddr
		}
	}
	for name, addr := range want {
		_, port, err := net.SplitHostPort(addr)
		if err != nil {
			t.Errorf("%s: %s address %q: %v", where, name, addr, err)
			continue
		}
		got, ok := containerPort(spec, name)
		if !ok || strconv.Itoa(int(got)) != port {
			t.Errorf("%s: imd %s listens on %s (%s): want a container port named %s = %s (got %d)", where, role, addr, name, name, port, got)
		}
	}
	for _, p := range c.Ports {
		if _, ok := want[p.Name]; !ok {
			t.Errorf("%s: container port %s: imd %s does not listen on it with this config", where, p.Name, role)
		}
	}
	if adv, ok := env["IMD_ADVERTISE"]; ok && role != "gateway" {
		if _, port, _ := net.SplitHostPort(want["rpc"]); !strings.HasSuffix(adv, ":"+port) {
			t.Errorf("%s: IMD_ADVERTISE=%s: gateways dial it for the RPC port %s", where, adv, port)
		}
	}
	// Probes: the health endpoints (logic/http.go) on the HTTP port.
	probes := map[string]*corev1.Probe{"readiness": c.ReadinessProbe, "liveness": c.LivenessProbe}
	for kind, p := range probes {
		if p == nil || p.HTTPGet == nil {
			t.Errorf("%s: no %s probe over HTTP", where, kind)
			continue
		}
		if p.HTTPGet.Port.StrVal != "http" {
			t.Errorf("%s: %s probe on port %s, want the named port http", where, kind, p.HTTPGet.Port.String())
		}
		if p.HTTPGet.Path != "/healthz" && p.HTTPGet.Path != "/readyz" {
			t.Errorf("%s: %s probe asks %s, want /healthz or /readyz", where, kind, p.HTTPGet.Path)
		}
	}
	if c.LivenessProbe != nil && c.LivenessProbe.HTTPGet != nil && c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("%s: liveness on %s: /readyz is 503 while draining or while no logic node answers, which a restart does not cure", where, c.LivenessProbe.HTTPGet.Path)
	}
	if role == "gateway" && c.ReadinessProbe != nil && c.ReadinessProbe.HTTPGet != nil && c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("%s: a gateway's readiness is /readyz (no logic node reachable, draining)", where)
	}
	// The grace period must outlast the preStop pause and imd's drain.
	var pause time.Duration
	if l := c.Lifecycle; l != nil && l.PreStop != nil {
		if l.PreStop.Sleep == nil {
			t.Errorf("%s: preStop: use the sleep action (the image has no shell)", where)
		} else {
			pause = time.Duration(l.PreStop.Sleep.Seconds) * time.Second
		}
	}
	grace := 30 * time.Second
	if spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*spec.TerminationGracePeriodSeconds) * time.Second
	}
	if grace < pause+cfg.ShutdownGrace+5*time.Second {
		t.Errorf("%s: terminationGracePeriodSeconds %s must exceed preStop %s + shutdown_grace %s by 5s at least: imd drains that long on SIGTERM",
			where, grace, pause, cfg.ShutdownGrace)
	}
}

func lastDash(s string) string {
	if i := strings.LastIndex(s, "-"); i >= 0 {
		return s[i+1:]
	}
	return ""
}

func (m *manifests) configMapNamed(name string) *corev1.ConfigMap {
	return m.configMaps[name]
}

// containerEnv is the container's environment as the kubelet gives it:
// envFrom ConfigMaps, then env (literals with $(VAR) expanded, ConfigMap
// keys, stand-ins for Secrets and the downward API).
func (m *manifests) containerEnv(c *corev1.Container) map[string]string {
	env := map[string]string{}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef != nil {
			if cm := m.configMapNamed(ef.ConfigMapRef.Name); cm != nil {
				for k, v := range cm.Data {
					env[ef.Prefix+k] = v
				}
			}
		}
	}
	expand := regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)
	for _, e := range c.Env {
		switch r := e.ValueFrom; {
		case r == nil:
			env[e.Name] = expand.ReplaceAllStringFunc(e.Value, func(s string) string {
				if v, ok := env[s[2:len(s)-1]]; ok {
					return v
				}
				return s
			})
		case r.ConfigMapKeyRef != nil:
			if cm := m.configMapNamed(r.ConfigMapKeyRef.Name); cm != nil {
				env[e.Name] = cm.Data[r.ConfigMapKeyRef.Key]
			}
		case r.SecretKeyRef != nil:
			env[e.Name] = "stand-in-for-" + r.SecretKeyRef.Name + "-" + r.SecretKeyRef.Key
		case r.FieldRef != nil:
			env[e.Name] = "10.0.0.1" // status.podIP and the like
		}
	}
	return env
}

// catCommand is the config init container's `cat A B > C`.
var catCommand = regexp.MustCompile(`^cat((?: \S+)+) > (\S+)$`)

// podCommand returns how the pod runs imd: its arguments, environment and
// config file text (the file the pod reads, as its volumes and init
// container assemble it, Secrets replaced by the examples beside the
// manifests).
func (m *manifests) podCommand(t *testing.T, w workload) (args []string, env map[string]string, cfgText string) {
	t.Helper()
	c := imdContainer(w.spec)
	if c == nil {
		return nil, nil, ""
	}
	env = m.containerEnv(c)
	var cfgPath string
	for i, a := range c.Args {
		if v, ok := strings.CutPrefix(a, "--config="); ok {
			cfgPath = v
		} else if a == "--config" && i+1 < len(c.Args) {
			cfgPath = c.Args[i+1]
		}
	}
	if cfgPath == "" {
		t.Errorf("%s: imd gets no --config", w.where)
		return nil, nil, ""
	}
	// files maps a path in the pod to its content.
	files := map[string]string{}
	mount := func(ct *corev1.Container) {
		for _, vm := range ct.VolumeMounts {
			for _, v := range w.spec.Volumes {
				if v.Name != vm.Name {
					continue
				}
				var items map[string]string
				switch {
				case v.ConfigMap != nil:
					if cm := m.configMapNamed(v.ConfigMap.Name); cm != nil {
						items = cm.Data
					}
				case v.Secret != nil && v.Secret.SecretName == "imd-apps":
					b, err := os.ReadFile(appsExample)
					if err != nil {
						t.Fatal(err)
					}
					items = map[string]string{"apps.yaml": string(b)}
				}
				for k, text := range items {
					if vm.SubPath != "" {
						if vm.SubPath == k {
							files[vm.MountPath] = text
						}
						continue
					}
					files[filepath.Join(vm.MountPath, k)] = text
				}
			}
		}
	}
	for i := range w.spec.InitContainers {
		ic := &w.spec.InitContainers[i]
		mount(ic)
		if len(ic.Command) != 3 || ic.Command[0] != "sh" || ic.Command[1] != "-c" {
			t.Errorf("%s: init container %s: the tests know only sh -c \"cat A B > C\"", w.where, ic.Name)
			continue
		}
		mm := catCommand.FindStringSubmatch(ic.Command[2])
		if mm == nil {
			t.Errorf("%s: init container %s: the tests know only sh -c \"cat A B > C\", not %q", w.where, ic.Name, ic.Command[2])
			continue
		}
		var out strings.Builder
		for _, f := range strings.Fields(mm[1]) {
			text, ok := files[f]
			if !ok {
				t.Errorf("%s: init container %s reads %s, which no volume provides", w.where, ic.Name, f)
			}
			out.WriteString(text)
		}
		files[mm[2]] = out.String()
	}
	mount(c)
	cfgText, ok := files[cfgPath]
	if !ok {
		t.Errorf("%s: --config %s: no volume or init container provides it", w.where, cfgPath)
		return nil, nil, ""
	}
	return c.Args, env, cfgText
}

// loadConfig reads the configuration as `imd <role>` does (internal/config:
// the file with unknown keys refused, then the environment, then flags),
// with the role's defaults as its --help shows them.
func loadConfig(t *testing.T, where, role string, args []string, env map[string]string, cfgText string) *config.Config {
	t.Helper()
	path := filepath.Join(t.TempDir(), "imd.yaml")
	if err := os.WriteFile(path, []byte(cfgText), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := config.Default()
	if d := help(t, role).defaults["http-addr"]; d != "" {
		cfg.HTTP.Addr = d // a gateway's is :8081
	}
	fs := flag.NewFlagSet(role, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	p := cfg.Flags(fs)
	cfg.ServerFlags(fs)
	args = withConfig(args[1:], path)
	if err := fs.Parse(args); err != nil {
		t.Errorf("%s: imd %s %v: %v", where, role, args, err)
		return nil
	}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	if err := cfg.Load(fs, p, args, lookup); err != nil {
		t.Errorf("%s: imd %s: %v", where, role, err)
		return nil
	}
	return &cfg
}
