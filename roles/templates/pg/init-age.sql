-- hiveseed: objects of the ai_memory database on {{ node.name }} (region {{ region.name }}).
-- Applied by psql as postgres over the local socket after the role and database exist
-- (cmd:sql-role); every statement is idempotent, so a re-run changes nothing.

-- Both extensions are untrusted: only a superuser can create them. vector lives in public, which
-- every peer's search_path ends with.
CREATE EXTENSION IF NOT EXISTS age;
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;

-- The AGE graph (AGE refuses names shorter than 3 characters).
LOAD 'age';
SET search_path = ag_catalog, "$user", public;
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = 'memory_graph') THEN
    PERFORM ag_catalog.create_graph('memory_graph');
  END IF;
END $$;

-- One schema per peer of the region: ic_peer_1 .. ic_peer_{{ region.peer_count }}, where K is a peer's position
-- among the region's peers. Each daemon migrates its own tables into its schema.
{%- for k in range(1, region.peer_count + 1) %}
CREATE SCHEMA IF NOT EXISTS ic_peer_{{ k }} AUTHORIZATION ai_memory;
{%- endfor %}

GRANT ALL PRIVILEGES ON DATABASE ai_memory TO ai_memory;
GRANT ALL PRIVILEGES ON SCHEMA public, {% for k in range(1, region.peer_count + 1) %}ic_peer_{{ k }}, {% endfor %}ag_catalog TO ai_memory;
-- A non-superuser reaches AGE through ag_catalog (USAGE, or cypher() does not resolve).
GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA ag_catalog TO ai_memory;
GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA ag_catalog TO ai_memory;
GRANT ALL PRIVILEGES ON ALL FUNCTIONS IN SCHEMA ag_catalog TO ai_memory;

-- Creating a vertex or edge label makes a table inheriting the graph's base tables, which only
-- their owner may do: the daemon's role owns the graph's schema and its relations.
DO $$
DECLARE
  rel regclass;
BEGIN
  ALTER SCHEMA memory_graph OWNER TO ai_memory;
  FOR rel IN
    SELECT c.oid::regclass FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'memory_graph' AND c.relkind IN ('r', 'p')
      AND c.relowner <> 'ai_memory'::regrole
  LOOP
    EXECUTE format('ALTER TABLE %s OWNER TO ai_memory', rel);
  END LOOP;
  -- Sequences owned by a column moved with their table; the graph's own sequences move here.
  FOR rel IN
    SELECT c.oid::regclass FROM pg_class c
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE n.nspname = 'memory_graph' AND c.relkind = 'S'
      AND c.relowner <> 'ai_memory'::regrole
      AND NOT EXISTS (
        SELECT 1 FROM pg_depend d
        WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid AND d.deptype IN ('a', 'i'))
  LOOP
    EXECUTE format('ALTER SEQUENCE %s OWNER TO ai_memory', rel);
  END LOOP;
END $$;
