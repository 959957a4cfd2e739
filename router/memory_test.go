package router_test

import (
	"testing"

	"github.com/imd-dev/imd/router"
	"github.com/imd-dev/imd/router/routertest"
)

func TestMemoryConformance(t *testing.T) {
	routertest.Run(t, func(*testing.T) router.Router { return router.NewMemory() })
}
