-- hiveseed: objects of the ai_memory stores on {{ node.name }} (region {{ region.name }}, store
-- layout "{{ region.store_layout }}"). Applied by psql as postgres over the local socket, connected
-- to the postgres database, after the role and the databases exist (cmd:sql-role); every
-- statement is idempotent, so a re-run changes nothing.
{%- if region.store_layout == "schema" %}
--
-- The seed's layout: one database ai_memory, one schema per peer of the region, ic_peer_1 ..
-- ic_peer_{{ region.peer_count }}, where K is a peer's position among the region's peers. Each daemon migrates its own
-- tables into its schema.
{%- else %}
--
-- One database per peer of the region, ai_memory_peer_1 .. ai_memory_peer_{{ region.peer_count }}, where K is a
-- peer's position among the region's peers. Each daemon migrates its own tables into its
-- database's public schema, the only one ai-memory 0.7.0's embedding-dimension probe reads.
{%- endif %}
--
-- In each database: age and vector are untrusted extensions, which only a superuser can create;
-- vector lives in public, which every peer's search_path holds. The AGE graph memory_graph (AGE
-- refuses names shorter than 3 characters). A non-superuser reaches AGE through ag_catalog (USAGE,
-- or cypher() does not resolve). Creating a vertex or edge label makes a table inheriting the
-- graph's base tables, which only their owner may do: the daemon's role owns the graph's schema
-- and its relations (sequences owned by a column move with their table; the graph's own
-- sequences are moved explicitly).
{%- for db in region.databases %}

\connect {{ db.name }}
CREATE EXTENSION IF NOT EXISTS age;
CREATE EXTENSION IF NOT EXISTS vector WITH SCHEMA public;

LOAD 'age';
SET search_path = ag_catalog, "$user", public;
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM ag_catalog.ag_graph WHERE name = 'memory_graph') THEN
    PERFORM ag_catalog.create_graph('memory_graph');
  END IF;
END $$;
{%- if db.schemas %}
{% for s in db.schemas %}
CREATE SCHEMA IF NOT EXISTS {{ s }} AUTHORIZATION ai_memory;
{%- endfor %}
{%- endif %}

GRANT ALL PRIVILEGES ON DATABASE {{ db.name }} TO ai_memory;
GRANT ALL PRIVILEGES ON SCHEMA public, {% for s in db.schemas %}{{ s }}, {% endfor %}ag_catalog TO ai_memory;
GRANT ALL PRIVILEGES ON ALL TABLES IN SCHEMA ag_catalog TO ai_memory;
GRANT ALL PRIVILEGES ON ALL SEQUENCES IN SCHEMA ag_catalog TO ai_memory;
GRANT ALL PRIVILEGES ON ALL FUNCTIONS IN SCHEMA ag_catalog TO ai_memory;

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
{%- endfor %}
